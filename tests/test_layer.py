"""The MoE layer equals the naive per-expert loop (outputs and gradients), in every mode it offers."""

from __future__ import annotations

import pytest
import torch

import impls
from impls.layer import grouped_mm_available, make_dispatch
from impls.oracle import moe_loop_reference

D, F = 16, 24

CASES = {
    "dropless-top2-gelu": ("topk", {"num_experts": 4, "k": 2}, "gelu"),
    "dropless-top2-swiglu": ("topk", {"num_experts": 4, "k": 2}, "swiglu"),
    "capacity-top1-drops": ("switch", {"num_experts": 4, "capacity_factor": 0.5}, "gelu"),
    "capacity-top2-st-moe": ("st_moe", {"num_experts": 4, "capacity_factor": 0.75}, "gelu"),
    "variable-k-top-p": ("top_p", {"num_experts": 4, "top_p": 0.7}, "gelu"),
    "shared-experts-deepseekmoe": ("deepseekmoe_16b", {}, None),
    "shared-gate-qwen": ("qwen1_5_moe", {"num_experts": 8}, None),
    "groups-sigmoid-deepseek-v3": ("deepseek_v3", {}, None),
    "dense-gate": ("dense_softmax", {"num_experts": 4}, "gelu"),
}


def make_layer(case: str, impl: str, dtype=torch.float32, **extra) -> impls.MoELayer:
    router, opts, activation = CASES[case]
    torch.manual_seed(0)
    kw = {"activation": activation} if activation else {}
    return impls.MoELayer(D, F, router=router, expert_impl=impl, dtype=dtype, **kw, **opts, **extra)


def grads(
    layer: impls.MoELayer, x: torch.Tensor, out: torch.Tensor, g: torch.Tensor
) -> dict[str, torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    (out.float() * g).sum().backward()
    named = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    named["x"] = x.grad.clone()
    return named


def assert_matches_oracle(
    layer: impls.MoELayer, shape: tuple[int, int], dtype=torch.float32, device: str = "cpu"
) -> None:
    """Layer output and every gradient equal the loop oracle's (tight in float32, loose in bf16)."""
    x = torch.randn(*shape, D, dtype=dtype, device=device, requires_grad=True)
    g = torch.randn(*shape, D, device=device)
    out, plan = layer(x)
    assert out.dtype == dtype
    fast = grads(layer, x, out, g)
    ref, ref_plan = moe_loop_reference(layer, x)
    slow = grads(layer, x, ref, g)
    assert fast.keys() == slow.keys() and "router.gate.weight" in fast
    if dtype == torch.float32:
        assert torch.equal(plan.expert_ids_TK, ref_plan.expert_ids_TK)
        out_tol, grad_tol = {"atol": 1e-5, "rtol": 1e-5}, {"atol": 1e-5, "rtol": 1e-4}
    else:
        out_tol, grad_tol = {"atol": 3e-2, "rtol": 3e-2}, {"atol": 5e-2, "rtol": 5e-2}
    torch.testing.assert_close(out.float(), ref.float(), **out_tol)
    for name in fast:
        torch.testing.assert_close(
            fast[name].float(), slow[name].float(), **grad_tol, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("impl", ["grouped_mm", "bmm"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_matches_the_loop_oracle_in_float32(case: str, impl: str) -> None:
    assert_matches_oracle(make_layer(case, impl).train(), (2, 6))


@pytest.mark.parametrize("impl", ["grouped_mm", "bmm"])
@pytest.mark.parametrize(
    "case", ["dropless-top2-swiglu", "capacity-top2-st-moe", "shared-experts-deepseekmoe"]
)
def test_layer_matches_the_loop_oracle_in_bfloat16(case: str, impl: str) -> None:
    assert_matches_oracle(make_layer(case, impl, dtype=torch.bfloat16).train(), (2, 8), torch.bfloat16)


def test_float64_layer_passes_gradcheck_against_finite_differences() -> None:
    torch.manual_seed(0)
    layer = impls.MoELayer(6, 5, 3, router="topk", k=2, dtype=torch.float64, num_shared_experts=1).eval()
    x = torch.randn(7, 6, dtype=torch.float64)
    plan = layer.route(x)  # fixed routing: finite differences must not flip a top-k choice
    assert layer.experts.resolve_impl("auto", x) == "bmm"
    f = lambda x_: layer.mix(x_, plan)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x.requires_grad_(),), eps=1e-6, atol=1e-6)


def test_unaligned_widths_fall_back_to_the_exact_padded_bmm() -> None:
    torch.manual_seed(0)
    layer = impls.MoELayer(6, 10, 4, router="topk", k=2)
    x = torch.randn(9, 6)
    assert layer.experts.resolve_impl("auto", x) == "bmm"
    out, _ = layer(x)
    ref, _ = moe_loop_reference(layer, x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_grouped_mm_is_probed_per_dtype() -> None:
    assert grouped_mm_available("cpu", torch.float32)
    assert not grouped_mm_available("cpu", torch.float64)


def test_dropped_tokens_contribute_exactly_zero() -> None:
    layer = make_layer("capacity-top1-drops", "auto").train()
    x = torch.randn(12, D)
    out, plan = layer(x)
    dropped = plan.dropped_TK[:, 0]
    assert dropped.any() and (~dropped).any()
    assert (out[dropped] == 0).all()
    assert (out[~dropped].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("layer_dtype", [torch.float32, torch.bfloat16])
def test_output_dtype_equals_input_dtype(layer_dtype) -> None:
    layer = impls.MoELayer(D, F, 4, router="topk", k=2, dtype=layer_dtype)
    for dtype in (torch.bfloat16, torch.float32):
        out, plan = layer(torch.randn(3, 4, D, dtype=dtype))
        assert out.dtype == dtype and out.shape == (3, 4, D)
        assert plan.weights_TK.dtype == torch.float32


def test_padding_rows_are_zero_and_take_no_expert_slot() -> None:
    layer = make_layer("shared-experts-deepseekmoe", "auto")
    x = torch.randn(2, 5, D)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out, plan = layer(x, mask)
    assert (out[1, 3:] == 0).all() and (out[0].abs().sum(-1) > 0).all()
    assert not (plan.keep_TK & plan.selected_TK)[8:].any()
    ref, _ = moe_loop_reference(layer, x, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bad_inputs_name_the_argument() -> None:
    layer = impls.MoELayer(D, F, 4)
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 3, D + 1))
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        layer(torch.randn(2, 3, D), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask must be bool"):
        layer(torch.randn(2, 3, D), torch.ones(2, 3))
    with pytest.raises(ValueError, match="expert_impl"):
        impls.MoELayer(D, F, 4, expert_impl="loop")
    with pytest.raises(ValueError, match="d_model"):
        impls.MoELayer(D, F, router=impls.build_router("topk", d_model=D + 2, num_experts=4))
    with pytest.raises(TypeError, match="need a router name"):
        impls.MoELayer(D, F, router=impls.build_router("topk", d_model=D, num_experts=4), k=2)


def test_presets_bring_their_layer_settings_and_loss_weights() -> None:
    qwen = impls.MoELayer(D, F, router="qwen1_5_moe")
    assert qwen.num_experts == 60 and qwen.activation == "swiglu"
    assert qwen.shared is not None and qwen.shared.gate is not None
    assert qwen.shared.mlp.d_hidden == 4 * F
    v3 = impls.MoELayer(D, F, router="deepseek_v3")
    assert v3.num_shared_experts == 1 and v3.loss_coefficients == {"seq_load_balance": 1e-4}
    plain = impls.MoELayer(D, F, router="deepseek_v3", num_shared_experts=0, activation="gelu")
    assert plain.shared is None and plain.activation == "gelu"


def test_forward_tasks_runs_the_experts_once_for_every_task_gate() -> None:
    torch.manual_seed(0)
    layer = impls.MoELayer(D, F, 4, router="mmoe")
    x = torch.randn(2, 3, D)
    outs, plans = layer.forward_tasks(x)
    assert len(outs) == 2
    for out, plan in zip(outs, plans, strict=True):
        ref, _ = moe_loop_reference(layer, x, plan=plan)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs[0], outs[1])
    with pytest.raises(TypeError, match="route_tasks"):
        impls.MoELayer(D, F, 4).forward_tasks(x)


def test_dispatch_groups_slots_by_expert_in_a_permutation() -> None:
    torch.manual_seed(0)
    router = impls.build_router("top_p", d_model=D, num_experts=4, top_p=0.5)
    plan = router(torch.randn(10, D))
    d = make_dispatch(plan)
    assert sorted(d.slot_pos_TK.reshape(-1).tolist()) == list(range(plan.expert_ids_TK.numel()))
    assert d.counts_E.sum().item() == (plan.keep_TK & plan.selected_TK).sum().item()
    sorted_experts = plan.expert_ids_TK.reshape(-1)[torch.argsort(d.slot_pos_TK.reshape(-1))]
    n = int(d.counts_E.sum())
    assert (sorted_experts[:n].diff() >= 0).all()


@pytest.mark.parametrize("max_k", [0, 4], ids=["bmm-sums", "elementwise-sums"])
def test_unfused_gather_path_matches_the_fused_one(monkeypatch, max_k: int) -> None:
    # CUDA and half precision use the gather + mask + sum path; check it on CPU in float32 too
    layer = make_layer("capacity-top2-st-moe", "grouped_mm").train()
    x = torch.randn(2, 6, D, requires_grad=True)
    g = torch.randn(2, 6, D)
    out, _ = layer(x)
    fused = grads(layer, x, out, g)
    monkeypatch.setattr(impls.layer, "_fused_bag", lambda t: False)
    monkeypatch.setattr(impls.layer, "_ELEMENTWISE_MAX_K", max_k)
    out2, _ = layer(x)
    unfused = grads(layer, x, out2, g)
    torch.testing.assert_close(out, out2, atol=1e-6, rtol=1e-6)
    for name in fused:
        torch.testing.assert_close(fused[name], unfused[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("max_k", [0, 4], ids=["bmm-sums", "elementwise-sums"])
def test_unfused_combine_passes_gradcheck_with_dropped_slots(monkeypatch, max_k: int) -> None:
    # the combine used on CUDA and in half precision has a hand-written backward: check it in float64
    monkeypatch.setattr(impls.layer, "_fused_bag", lambda t: False)
    monkeypatch.setattr(impls.layer, "_ELEMENTWISE_MAX_K", max_k)
    torch.manual_seed(0)
    layer = make_layer("capacity-top1-drops", "bmm", dtype=torch.float64).train()
    x = torch.randn(12, D, dtype=torch.float64)
    plan = layer.route(x)
    assert plan.dropped_TK.any()
    d = make_dispatch(plan)
    y = torch.randn(d.token_N.shape[0], D, dtype=torch.float64, requires_grad=True)
    w = plan.weights_TK.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda y, w: impls.layer.combine(y, d, w, torch.float64), (y, w))
