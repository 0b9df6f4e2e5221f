"""Edge inputs for every registered router and preset, and for the layer: empty batches, non-finite
tokens, padding, small configurations. The policy is documented in ``impls.router``."""

from __future__ import annotations

import math
import re

import pytest
import torch
from test_router_contract import NAMES, D, build, expect, maybe_skip, num_experts, tokens, with_routing_inputs

import impls
from impls.routers.assignment.sinkhorn import EFFICIENT_ROUTING_OT, SSR

MODES = ("train", "eval")


def _mode(router: impls.Router, mode: str) -> impls.Router:
    return router.train(mode == "train")


def _others(plan: impls.RoutingPlan, bad: int) -> dict[str, torch.Tensor]:
    keep = torch.ones(plan.num_tokens, dtype=torch.bool)
    keep[bad] = False
    return {
        "ids": plan.expert_ids_TK[keep],
        "weights": plan.weights_TK[keep],
        "kept": plan.keep_TK[keep],
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(0, D), (3, 0, D)], ids=["T0", "B3xS0"])
@pytest.mark.parametrize("name", NAMES)
def test_an_empty_batch_gives_an_empty_plan_with_finite_zero_losses(name, shape, mode):
    router = _mode(build(name), mode)
    before = {k: v.clone() for k, v in router.state_dict().items() if isinstance(v, torch.Tensor)}
    plan = router(torch.randn(*shape))
    assert plan.num_tokens == 0 and plan.expert_ids_TK.shape[0] == 0 and plan.weights_TK.shape[0] == 0
    for loss_name, value in plan.losses.items():
        assert value.dim() == 0 and torch.isfinite(value) and float(value) == 0.0, loss_name
    total = plan.aux_loss({n: 1.0 for n in plan.losses}) + plan.weights_TK.sum()
    if total.requires_grad:
        total.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in router.parameters())
    after = router.state_dict()
    for key, value in before.items():  # an empty batch changes no router state
        assert torch.equal(value, after[key]), key
    assert int(plan.info["nonfinite_tokens"]) == 0


@pytest.mark.parametrize("shape", [(0, D), (2, 0, D)], ids=["T0", "B2xS0"])
@pytest.mark.parametrize(
    "name", ["mixtral_8x7b", "switch_base", "sinkhorn_ot", "expert_choice", "deepseek_v3"]
)
def test_the_layer_takes_an_empty_batch(name, shape):
    layer = impls.MoELayer(d_model=D, d_hidden=8, num_experts=num_experts(name), router=name)
    x = torch.randn(*shape, requires_grad=True)
    out, plan = layer(x)
    assert out.shape == x.shape and plan.num_tokens == 0
    (out.sum() + plan.aux_loss(layer.loss_coefficients)).backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_a_non_finite_token_is_routed_nowhere_and_changes_no_other_token(name, mode, bad_value):
    """The plan with token 5 non-finite equals the plan with token 5 as padding, for every token."""
    x = tokens(name)
    bad = 5
    x_bad = x.clone()
    x_bad[bad, 3] = bad_value
    mask = torch.ones(x.shape[0], dtype=torch.bool)
    mask[bad] = False
    router = _mode(build(name), mode)
    torch.manual_seed(7)
    padded = router(x, mask)
    router = _mode(build(name), mode)
    torch.manual_seed(7)
    plan = router(x_bad)
    for key, value in _others(plan, bad).items():
        torch.testing.assert_close(value, _others(padded, bad)[key], rtol=0, atol=0, msg=key)
    assert not plan.keep_TK[bad].any() and float(plan.weights_TK[bad].abs().sum()) == 0.0
    assert int(plan.info["nonfinite_tokens"]) == 1
    for loss_name, value in plan.losses.items():
        torch.testing.assert_close(value, padded.losses[loss_name], msg=loss_name)
    x_bad.requires_grad_(True)
    router = _mode(build(name), mode)
    torch.manual_seed(7)
    plan = router(x_bad)
    total = plan.aux_loss({n: 1.0 for n in plan.losses}) + plan.weights_TK.sum()
    if total.requires_grad:  # every other token's input gradient stays finite
        total.backward()
        assert torch.isfinite(x_bad.grad[mask]).all(), name


def test_a_non_finite_token_leaves_every_other_layer_output_unchanged():
    layer = impls.MoELayer(d_model=D, d_hidden=8, num_experts=8, router="sinkhorn_ot", k=2)
    x = torch.randn(32, D)
    x_bad = x.clone()
    x_bad[9] = math.nan
    mask = torch.ones(32, dtype=torch.bool)
    mask[9] = False
    clean, _ = layer(x, mask)
    out, plan = layer(x_bad)
    assert torch.isfinite(out[mask]).all()
    torch.testing.assert_close(out[mask], clean[mask])
    assert float(out[9].abs().sum()) == 0.0 and int(plan.info["nonfinite_tokens"]) == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_padding_keeps_no_slot(name, mode):
    x = tokens(name)
    mask = torch.ones(x.shape[0], dtype=torch.bool)
    mask[::3] = False
    plan = _mode(build(name), mode)(x, mask)
    assert not plan.keep_TK[~mask].any()
    assert float(plan.weights_TK[~mask].abs().sum()) == 0.0


@pytest.mark.parametrize("name", [n for n in NAMES if n in impls.ROUTERS])
def test_one_expert_and_k_equal_to_the_expert_count(name):
    """E = 1 and k = E build and route, unless the method itself forbids it, which it says."""
    maybe_skip(name, "test_one_expert_and_k_equal_to_the_expert_count")
    for experts, k in ((1, 1), (4, 4)):
        options = {**expect(name).options, "k": k}
        if "num_domains" in options:
            options["num_domains"] = 1
        try:
            router = with_routing_inputs(impls.build_router(name, d_model=D, num_experts=experts, **options))
        except (ValueError, TypeError) as exc:
            assert re.search(r"\bk\b", str(exc)), exc  # a method constraint on k, named as such
            continue
        for mode in MODES:
            plan = _mode(router, mode)(torch.randn(12, D))
            assert plan.num_experts == experts
            assert all(torch.isfinite(v) for v in plan.losses.values())
            assert int(plan.expert_ids_TK.max()) < experts


@pytest.mark.parametrize("name", ["topk", "switch", "deepseek", "sinkhorn_ot", "noisy_topk"])
def test_k_above_the_expert_count_is_a_clear_error(name):
    with pytest.raises(ValueError, match=r"k must be in \[1, num_experts=4\], got k=5"):
        impls.build_router(name, d_model=D, num_experts=4, k=5)


def test_a_preset_with_fewer_experts_than_its_paper_names_the_conflicting_options():
    with pytest.raises(ValueError) as info:
        impls.build_router("deepseek_v3", d_model=D, num_experts=8)
    text = str(info.value)
    for part in (
        "preset 'deepseek_v3'",
        "num_experts=256",
        "num_experts=8",
        "k=8",
        "topk_group=4",
        "n_group=8",
    ):
        assert part in text, text
    impls.build_router("deepseek_v3", d_model=D, num_experts=8, n_group=4, topk_group=4)  # resolved


# -- paper fidelity --------------------------------------------------------------------------


def test_jamba_combines_with_the_raw_top2_softmax_probabilities():
    """Jamba's block: softmax over 16 experts, top-2, weights not renormalized (hand-checked)."""
    router = impls.build_router("jamba", d_model=4, num_experts=4)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    plan = router.eval()(torch.tensor([[2.0, 1.0, 0.0, -1.0]]))
    # softmax([2, 1, 0, -1]) = [0.643914, 0.236883, 0.087144, 0.032059]
    assert plan.expert_ids_TK.tolist() == [[0, 1]]
    torch.testing.assert_close(plan.weights_TK, torch.tensor([[0.643914, 0.236883]]), atol=1e-6, rtol=0)
    assert router.combine_normalization == "at_most_one"


def test_deepseek_v3_balance_loss_counts_the_unbiased_top_k_not_the_biased_selection():
    """V3 eq. 17-20 on a hand-checked case: 2 tokens, 4 experts, K_r = 1, alpha = 1.

    Sigmoid affinities s = sigmoid(h). Expert 3 carries a large selection bias, so the biased
    selection is expert 3 for both tokens; the plain top-1 of s is expert 0 (token 0) and 1 (token 1).
    f_i = N_r / (K_r T) * count_i = 4/2 * count_i; P_i = mean_t s'_{i,t} with s' = s / sum_j s.
    """
    h = torch.tensor([[2.0, 0.0, -1.0, -2.0], [0.0, 2.0, -1.0, -2.0]])
    small = {"d_model": 4, "num_experts": 4, "k": 1, "n_group": 1, "topk_group": 1, "normalize": False}
    router = impls.build_router("deepseek_v3", **small)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    plan = router.train()(h)
    assert plan.expert_ids_TK.flatten().tolist() == [3, 3]  # the biased selection
    s = torch.sigmoid(h)
    p = (s / s.sum(-1, keepdim=True)).mean(0)
    paper = (2.0 * torch.tensor([1.0, 1.0, 0.0, 0.0]) * p).sum()  # counts of the unbiased top-1
    selected = (2.0 * torch.tensor([0.0, 0.0, 0.0, 2.0]) * p).sum()  # counts of the biased choice
    torch.testing.assert_close(plan.losses["seq_load_balance"], paper)
    assert not torch.isclose(paper, selected)
    other = impls.build_router("deepseek_v3", **small, balance_counts="selected")
    with torch.no_grad():
        other.gate.weight.copy_(torch.eye(4))
        other.expert_bias.copy_(router.expert_bias)
    torch.testing.assert_close(other.train()(h).losses["seq_load_balance"], selected)


def _skewed(tokens: int, experts: int, seed: int = 0) -> torch.Tensor:
    from scripts.measure_sinkhorn_balance import skewed_logits

    return skewed_logits(tokens, experts, favoured=0.8, margin=2.0, seed=seed)


def _selected_max_over_mean(name: str, h: torch.Tensor, **options) -> tuple[float, float]:
    experts = h.shape[1]
    router = impls.build_router(name, d_model=experts, num_experts=experts, **options)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(experts))
    plan = router.train()(h)
    load = plan.expert_load
    return float(load.max() / load.mean()), float(plan.info["sinkhorn_marginal_error"])


def test_sinkhorn_cancels_a_constant_column_shift_exactly():
    h = torch.randn(1024, 8, generator=torch.Generator().manual_seed(3))
    a = impls.build_router("sinkhorn_ot", d_model=8, num_experts=8)
    with torch.no_grad():
        a.gate.weight.copy_(torch.eye(8))
    shifted = h.clone()
    shifted[:, 0] += 3.0
    assert torch.equal(a.train()(h).expert_ids_TK, a.train()(shifted).expert_ids_TK)


def test_sinkhorn_selected_loads_under_a_token_dependent_skew_against_epsilon():
    """Marginals balanced at any ε; the selection only at the presets' ε (measured, see the page)."""
    h = _skewed(4096, 8)
    assert (h.argmax(-1) == 0).float().mean() > 0.5  # plain top-1 would overload expert 0 badly
    at_one, err_one = _selected_max_over_mean("sinkhorn_ot", h, k=1, epsilon=1.0)
    chosen = EFFICIENT_ROUTING_OT.options["epsilon"]
    at_chosen, err_chosen = _selected_max_over_mean("sinkhorn_ot", h, k=1, epsilon=chosen)
    assert err_one < 1e-4 and err_chosen < 1e-4  # the plan's marginals hold at both
    assert at_one > 1.2  # ... but at ε = 1 the busiest expert's selected load is well above the mean
    assert at_chosen < 1.08
    assert SSR.options["epsilon"] == chosen
    sbase, _ = _selected_max_over_mean("s_base", h)
    assert sbase == pytest.approx(at_one)  # S-BASE keeps Megatron's ε = 1, and its imbalance
