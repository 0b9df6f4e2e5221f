"""The contract of the sequence-level routers (``plan_type`` ``"slots"`` or ``"merge"``): Soft MoE's
slots and the merged-expert routers (SMEAR, MEO, Lory, MoV, Omni-SMoLA), every router and preset.

The same promises as ``test_router_contract`` makes for token routers, in the terms of
``impls.SlotPlan`` and ``impls.MergePlan``: float32 weights that are convex where the router says so,
gradients, deterministic evaluation, padding and non-finite tokens excluded, bf16 input, the
``[T, D]`` and ``[B, L, D]`` forms agreeing, state round trips, clear errors, CUDA.
"""

from __future__ import annotations

import pytest
import torch
from test_router_contract import SEQUENCE_NAMES, D, build

import impls

B, L = 3, 8


def seqs(n_seq: int = B, n_tok: int = L, seed: int = 1) -> torch.Tensor:
    return torch.randn(n_seq, n_tok, D, generator=torch.Generator().manual_seed(seed))


def weights(plan) -> torch.Tensor:
    """The plan's decision as one tensor: combine (slots) or merge weights (groups)."""
    return plan.combine_BLS if isinstance(plan, impls.SlotPlan) else plan.weights_BGE


def same(a, b, exact: bool = True) -> None:
    assert type(a) is type(b)
    tensors = ("dispatch_BLS", "combine_BLS") if isinstance(a, impls.SlotPlan) else ("weights_BGE",)
    for name in tensors:
        if exact:
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        else:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), msg=name)
    assert set(a.losses) == set(b.losses)
    for k in a.losses:
        torch.testing.assert_close(a.losses[k], b.losses[k])


def check(router, plan, tol: float = 1e-5) -> None:
    mask = plan.token_mask_BL
    if isinstance(plan, impls.SlotPlan):
        assert plan.dispatch_BLS.dtype == plan.combine_BLS.dtype == torch.float32
        for t in (plan.dispatch_BLS, plan.combine_BLS):
            assert torch.isfinite(t).all() and (t >= 0).all()
        assert plan.num_slots == router.num_experts * router.config.slots_per_expert
        cols = plan.dispatch_BLS.sum(1)  # [B, S]: every slot mixes its sequence's valid tokens
        has = mask.any(1)
        torch.testing.assert_close(cols[has], torch.ones_like(cols[has]), atol=tol, rtol=0)
        rows = plan.combine_BLS.sum(-1)
        torch.testing.assert_close(rows[mask], torch.ones_like(rows[mask]), atol=tol, rtol=0)
        assert (plan.dispatch_BLS[~mask] == 0).all() and (plan.combine_BLS[~mask] == 0).all()
    else:
        w = plan.weights_BGE
        assert w.dtype == torch.float32 and torch.isfinite(w).all() and (w >= 0).all()
        tw = plan.token_weights()[mask]
        if router.combine_normalization == 1.0:
            torch.testing.assert_close(tw.sum(-1), torch.ones_like(tw[:, 0]), atol=tol, rtol=0)
        else:
            assert (tw.sum(-1) <= 1 + tol).all()
        assert (tw > 0).sum(-1).max() <= router.max_experts_per_token
    for name, loss in plan.losses.items():
        assert loss.dim() == 0 and torch.isfinite(loss), name
    diag = plan.diagnostics()
    assert set(diag) == set(impls.DIAGNOSTICS)
    torch.testing.assert_close(diag["expert_load"].sum(), mask.sum().float(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", SEQUENCE_NAMES)
def test_plan_invariants(name, mode):
    router = build(name).train(mode == "train")
    check(router, router(seqs()))


@pytest.mark.parametrize("name", SEQUENCE_NAMES)
def test_gradients_reach_router_parameters(name):
    router = build(name).train()
    params = [p for p in router.parameters() if p.requires_grad]
    torch.manual_seed(3)
    plan = router(seqs())
    w = weights(plan)
    loss = (w * torch.rand_like(w)).sum() + sum(v for v in plan.losses.values() if v.requires_grad)
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads), "all router gradients are zero"


@pytest.mark.parametrize("name", SEQUENCE_NAMES)
def test_eval_is_deterministic(name):
    router = build(name).eval()
    x = seqs()
    torch.manual_seed(10)
    a = router(x)
    torch.manual_seed(11)
    same(a, router(x))


@pytest.mark.parametrize("name", SEQUENCE_NAMES)
def test_padding_changes_nothing_for_the_valid_tokens(name):
    router = build(name).eval()
    x = seqs()
    pad = 5 * seqs(n_tok=4, seed=2)
    mask = torch.cat([torch.ones(B, L, dtype=torch.bool), torch.zeros(B, 4, dtype=torch.bool)], 1)
    a, b = router(x), router(torch.cat([x, pad], 1), mask)
    check(router, b)
    if isinstance(a, impls.SlotPlan):
        torch.testing.assert_close(b.dispatch_BLS[:, :L], a.dispatch_BLS)
        torch.testing.assert_close(b.combine_BLS[:, :L], a.combine_BLS)
    else:
        torch.testing.assert_close(b.token_weights()[:, :L], a.token_weights())
    for k in a.losses:
        torch.testing.assert_close(b.losses[k], a.losses[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", SEQUENCE_NAMES)
def test_a_non_finite_token_is_treated_as_padding(name):
    router = build(name).eval()
    x = seqs()
    bad = x.clone()
    bad[1, 2, 5] = float("nan")
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 2] = False
    a, b = router(bad), router(x, mask)
    same(a, b)
    assert int(a.info["nonfinite_tokens"]) == 1 and int(b.info["nonfinite_tokens"]) == 0


@pytest.mark.parametrize("name", SEQUENCE_NAMES)
def test_bf16_input_routes_like_its_float32_values(name):
    router = build(name).eval()
    x = seqs().bfloat16()
    a = router(x)
    same(a, router(x.float()))
    assert weights(a).dtype == torch.float32


@pytest.mark.parametrize("name", SEQUENCE_NAMES)
def test_flat_tokens_with_sequence_length_equal_batch_seq_input(name):
    router = build(name).eval()
    x = seqs()
    same(router(x), router(x.reshape(B * L, D), sequence_length=L))
    with pytest.raises(ValueError, match="sequence_length"):
        router(x.reshape(B * L, D), sequence_length=5)


@pytest.mark.parametrize("name", SEQUENCE_NAMES)
def test_causal_routers_ignore_later_tokens(name):
    router = build(name).eval()
    if not router.is_causal:
        pytest.skip(f"{name} is not causal")
    x = seqs()
    y = x.clone()
    y[:, -1] = 10 * torch.randn(B, D)
    a, b = router(x), router(y)
    torch.testing.assert_close(a.token_weights()[:, :-1], b.token_weights()[:, :-1], rtol=0, atol=0)


@pytest.mark.parametrize("name", SEQUENCE_NAMES)
def test_router_state_survives_a_state_dict_round_trip(name):
    a, b = build(name).eval(), build(name).eval()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    b.load_state_dict(a.state_dict())
    x = seqs()
    same(a(x), b(x))


@pytest.mark.parametrize("name", SEQUENCE_NAMES)
def test_bad_input_is_rejected_with_a_clear_error(name):
    router = build(name)
    with pytest.raises(ValueError, match="shape"):
        router(torch.randn(2, 4, D + 1))
    with pytest.raises(TypeError, match="bool"):
        router(torch.randn(2, 4, D), torch.ones(2, 4))
    with pytest.raises(ValueError, match="token_mask"):
        router(torch.randn(2, 4, D), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating"):
        router(torch.ones(2, 4, D, dtype=torch.long))
    with pytest.raises(TypeError, match="routing input"):
        router(torch.randn(2, 4, D), token_ids=torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("shape", [(0, L, D), (B, 0, D), (0, D)], ids=["B0", "L0", "T0"])
@pytest.mark.parametrize("name", SEQUENCE_NAMES)
def test_an_empty_batch_gives_an_empty_plan_and_an_empty_layer_output(name, shape):
    router = build(name).train()
    plan = router(torch.randn(*shape))
    assert plan.num_tokens == 0
    assert all(torch.isfinite(v) for v in plan.losses.values())
    layer = impls.MoELayer(D, 8, router=build(name))
    x = torch.randn(*shape, requires_grad=True)
    out, _ = layer(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("name", SEQUENCE_NAMES)
def test_the_layer_mixes_finite_outputs_and_zeroes_padding(name):
    torch.manual_seed(0)
    layer = impls.MoELayer(D, 12, router=build(name), num_shared_experts=1)
    x = seqs().requires_grad_(True)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, -3:] = False
    out, _ = layer(x, mask)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out[~mask] == 0).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
    assert layer.experts.w_in_EDF.grad is not None and layer.experts.w_in_EDF.grad.abs().sum() > 0
    bf16 = layer.to(torch.bfloat16)(x.detach().bfloat16(), mask)[0]
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16.float()).all()


@pytest.mark.cuda
@pytest.mark.parametrize("name", SEQUENCE_NAMES)
def test_cpu_and_cuda_route_identically(name):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    router = build(name).eval()
    x = seqs()
    a = router(x)
    b = router.to("cuda")(x.cuda())
    torch.testing.assert_close(weights(a), weights(b).cpu(), atol=1e-5, rtol=1e-5)
