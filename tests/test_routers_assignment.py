"""Assignment and optimal-transport routers: BASE, expert choice, BIP, S-BASE, SSR, Sinkhorn OT."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import impls
from impls.ops.auction import balanced_assignment, balanced_capacities
from impls.ops.sinkhorn import sinkhorn

D = 16


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _build(name: str, num_experts: int = 8, **options):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # expert choice warns that it is not causal
        return impls.build_router(name, d_model=D, num_experts=num_experts, **options)


def _scipy_optimum(a: np.ndarray, capacities: np.ndarray) -> float:
    """Best total affinity, by linear_sum_assignment on the expanded matrix (column e repeated c_e times)."""
    cols = np.repeat(np.arange(a.shape[1]), capacities)
    r, c = linear_sum_assignment(a[:, cols], maximize=True)
    return float(a[r, cols[c]].sum())


def _total(a: torch.Tensor, expert_T: torch.Tensor) -> float:
    return float(a.double().gather(1, expert_T[:, None]).sum())


# ------------------------------------------------------------------------------- balanced assignment


def test_capacities_give_the_first_t_mod_e_experts_one_more_token():
    assert balanced_capacities(10, 4).tolist() == [3, 3, 2, 2]
    assert balanced_capacities(3, 5).tolist() == [1, 1, 1, 0, 0]
    assert balanced_capacities(16, 4).tolist() == [4, 4, 4, 4]


@pytest.mark.parametrize("seed", range(120))
def test_balanced_assignment_equals_the_scipy_optimum(seed):
    g = _gen(seed)
    T = int(torch.randint(1, 41, (1,), generator=g))
    E = int(torch.randint(2, 9, (1,), generator=g))
    a = torch.randn(T, E, generator=g)
    if seed % 3 == 0:
        a = a.round()  # many ties
    res = balanced_assignment(a)
    cap = balanced_capacities(T, E)
    assert torch.equal(torch.bincount(res.expert_T, minlength=E), cap)
    assert res.optimal
    best = _scipy_optimum(a.double().numpy(), cap.numpy())
    assert math.isclose(_total(a, res.expert_T), best, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize(("T", "E"), [(509, 8), (256, 16)])
def test_balanced_assignment_is_optimal_on_larger_problems(T, E):
    a = torch.randn(T, E, generator=_gen(T))
    res = balanced_assignment(a)
    cap = balanced_capacities(T, E)
    assert torch.equal(torch.bincount(res.expert_T, minlength=E), cap)
    assert math.isclose(
        _total(a, res.expert_T), _scipy_optimum(a.double().numpy(), cap.numpy()), rel_tol=1e-9
    )


@pytest.mark.parametrize("price_steps", [0, 8])
@pytest.mark.parametrize("max_rounds", [0, 1, 10_000])
def test_every_stage_mix_reaches_the_optimum(price_steps, max_rounds):
    """Prices or none, auction to the end or cut off: the repair always lands on the optimum."""
    a = torch.randn(60, 6, generator=_gen(1))
    cap = balanced_capacities(60, 6)
    res = balanced_assignment(a, price_steps=price_steps, max_rounds=max_rounds)
    assert res.rounds <= max_rounds and res.optimal
    assert torch.equal(torch.bincount(res.expert_T, minlength=6), cap)
    best = _scipy_optimum(a.double().numpy(), cap.numpy())
    assert math.isclose(_total(a, res.expert_T), best, rel_tol=1e-9)


def test_a_cut_off_auction_from_zero_prices_is_repaired_to_the_optimum():
    a = torch.randn(60, 6, generator=_gen(1))
    res = balanced_assignment(a, price_steps=0, max_rounds=1)
    assert res.rounds == 1 and res.repairs > 0 and res.searches >= 2 and res.optimal


@pytest.mark.parametrize("seed", range(3))
def test_router_sized_problems_are_solved_exactly(seed):
    """Router-like affinities (small logits, many near-ties) at T=2048, E=64: the default path."""
    g = _gen(100 + seed)
    x = torch.randn(2048, 64, generator=g)
    w = torch.linalg.qr(torch.randn(64, 64, generator=g))[0] * 0.1
    a = x @ w
    cap = balanced_capacities(2048, 64)
    res = balanced_assignment(a)
    assert res.optimal
    assert torch.equal(torch.bincount(res.expert_T, minlength=64), cap)
    best = _scipy_optimum(a.double().numpy(), cap.numpy())
    assert math.isclose(_total(a, res.expert_T), best, rel_tol=1e-9)


def test_one_price_step_gives_every_expert_exactly_its_capacity():
    """The reverse auction's defining step: expert e's new price, with the others' held fixed,
    makes exactly c_e tokens prefer e."""
    from impls.ops.auction import _equalizing_prices

    T, E = 200, 5
    a = torch.rand(T, E, generator=_gen(12), dtype=torch.float64)
    cap = torch.tensor([50, 50, 40, 30, 30])
    p0 = torch.rand(E, generator=_gen(13), dtype=torch.float64) * 0.2
    p1 = _equalizing_prices(a, cap, p0, steps=1, damping=1.0, c_max=50)
    for e in range(E):
        prices = p0.clone()
        prices[e] = p1[e]
        others = torch.cat([a[:, :e] - prices[:e], a[:, e + 1 :] - prices[e + 1 :]], 1).amax(1)
        assert int((a[:, e] - prices[e] > others).sum()) == int(cap[e])


def test_price_steps_leave_few_tokens_on_over_full_experts():
    from impls.ops.auction import _equalizing_prices

    x = torch.randn(4096, 64, generator=_gen(14), dtype=torch.float64)
    a = x @ torch.randn(64, 32, generator=_gen(15), dtype=torch.float64)
    a = (a - a.min()) / (a.max() - a.min())

    cap = balanced_capacities(4096, 32)

    def excess(prices):
        load = torch.bincount((a - prices).argmax(1), minlength=32)
        return int((load - cap).clamp_min(0).sum())

    zero = torch.zeros(32, dtype=torch.float64)
    after = _equalizing_prices(a, cap, zero, steps=8, damping=0.5, c_max=int(cap.max()))
    assert excess(zero) > 400 and excess(after) < 20


def test_a_cycle_is_cancelled_in_bulk_and_only_while_it_gains():
    """Three tokens sit on the wrong expert of a 2-cycle and a fourth swap would lose: one
    cancellation moves exactly the three pairs that gain."""
    from impls.ops.auction import _cancel

    # tokens 0-3 on expert 0 prefer expert 1 by 1.0, 0.5, 0.2, -0.3; tokens 4-7 on expert 1
    # prefer expert 0 by 0.9, 0.6, 0.1, -0.05
    pref0 = torch.tensor([-1.0, -0.5, -0.2, 0.3, 0.9, 0.6, 0.1, -0.05], dtype=torch.float64)
    a = torch.stack([pref0, torch.zeros(8, dtype=torch.float64)], 1)
    expert_T = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    out = _cancel(a, expert_T, [[0, 1]], tol=1e-12)
    # pair j gains (a-gain of token j) + (gain of token 4+j): 1.9, 1.1, 0.3 > 0, then -0.35 < 0
    assert out.tolist() == [1, 1, 1, 0, 0, 0, 0, 1]
    assert torch.equal(torch.bincount(out, minlength=2), torch.bincount(expert_T, minlength=2))


def test_the_cycle_search_returns_vertex_disjoint_negative_cycles():
    from impls.ops.auction import _negative_cycles

    W = torch.full((6, 6), 5.0, dtype=torch.float64)
    W[0, 1], W[1, 2], W[2, 0] = -1.0, -1.0, 1.0  # cost -1
    W[3, 4], W[4, 3] = -2.0, 1.0  # cost -1
    zero = torch.zeros(6, dtype=torch.float64)
    cycles, _, _ = _negative_cycles(W, 1e-12, zero)
    assert sorted(sorted(c) for c in cycles) == [[0, 1, 2], [3, 4]]
    for cyc in cycles:
        assert sum(float(W[e, f]) for e, f in zip(cyc, cyc[1:] + cyc[:1], strict=True)) < 0
    W[2, 0] = 2.5  # both cycles become non-negative
    W[4, 3] = 2.0
    cycles, dist, settled = _negative_cycles(W, 1e-12, zero)
    assert cycles == [] and settled
    # the distances certify it: a feasible potential, d_f <= d_e + W_ef on every edge
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    assert (dist[None, :] <= dist[:, None] + W + 1e-12)[off_diagonal].all()
    # warm-started from that potential, the search finds nothing and settles
    assert _negative_cycles(W, 1e-12, dist)[::2] == ([], True)


def test_without_repairs_the_result_is_feasible_but_not_certified():
    a = torch.randn(60, 6, generator=_gen(2))
    with pytest.warns(RuntimeWarning, match="not certified"):
        res = balanced_assignment(a, price_steps=0, max_rounds=0, max_repairs=0)
    assert not res.optimal
    assert torch.equal(torch.bincount(res.expert_T, minlength=6), balanced_capacities(60, 6))


@pytest.mark.parametrize("seed", range(40))
def test_random_capacities_with_empty_experts_reach_the_scipy_optimum(seed):
    g = _gen(1000 + seed)
    T = int(torch.randint(2, 41, (1,), generator=g))
    E = int(torch.randint(2, 9, (1,), generator=g))
    # random capacities summing to T, some of them zero
    cuts = torch.sort(torch.randint(0, T + 1, (E - 1,), generator=g)).values
    cap = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([T])]))
    a = torch.randn(T, E, generator=g)
    if seed % 2:
        a = (a * 2).round()  # ties
    res = balanced_assignment(a, cap)
    assert res.optimal
    assert torch.equal(torch.bincount(res.expert_T, minlength=E), cap)
    best = _scipy_optimum(a.double().numpy(), cap.numpy())
    assert math.isclose(_total(a, res.expert_T), best, rel_tol=1e-9, abs_tol=1e-9)


def test_explicit_capacities_and_masked_tokens():
    a = torch.randn(12, 3, generator=_gen(3))
    mask = torch.tensor([True] * 9 + [False] * 3)
    cap = torch.tensor([5, 3, 1])
    res = balanced_assignment(a, cap, token_mask_T=mask)
    assert (res.expert_T[~mask] == -1).all()
    assert torch.bincount(res.expert_T[mask], minlength=3).tolist() == [5, 3, 1]
    best = _scipy_optimum(a[mask].double().numpy(), cap.numpy())
    assert math.isclose(_total(a[mask], res.expert_T[mask]), best, rel_tol=1e-9)


def test_infinite_affinities_are_strong_preferences_and_nan_is_rejected():
    a = torch.randn(6, 3, generator=_gen(4))
    a[0, 1] = math.inf
    a[1, 0] = -math.inf
    res = balanced_assignment(a)
    assert res.expert_T[0] == 1 and res.expert_T[1] != 0 and res.optimal
    a[2, 2] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        balanced_assignment(a)


def test_bad_capacities_are_rejected():
    with pytest.raises(ValueError, match="capacities_E"):
        balanced_assignment(torch.randn(5, 2), torch.tensor([2, 2]))


# ------------------------------------------------------------------------------- BASE router


def test_base_training_balances_exactly_and_maximizes_total_affinity():
    router = _build("base_layers", num_experts=8).train()
    x = torch.randn(30, D, generator=_gen(5))
    plan = router(x)
    assert plan.expert_load.tolist() == [4, 4, 4, 4, 4, 4, 3, 3]
    logits = router.compute_logits(x).detach()
    best = _scipy_optimum(logits.double().numpy(), balanced_capacities(30, 8).numpy())
    assert math.isclose(_total(logits, plan.expert_ids_TK[:, 0]), best, rel_tol=1e-9)
    assert plan.info["assignment_optimal"] is True


def test_base_weight_is_the_sigmoid_affinity_and_trains_the_centroids():
    router = _build("base_layers", num_experts=4).train()
    x = torch.randn(16, D, generator=_gen(6))
    plan = router(x)
    logits = router.compute_logits(x)
    expected = logits.gather(1, plan.expert_ids_TK).sigmoid()
    torch.testing.assert_close(plan.weights_TK, expected)
    plan.weights_TK.sum().backward()
    assert router.gate.weight.grad.abs().sum() > 0


def test_base_inference_is_greedy_top1_unless_balanced_routing_is_asked():
    x = torch.randn(40, D, generator=_gen(7))
    greedy = _build("base_layers", num_experts=4).eval()
    plan = greedy(x)
    assert torch.equal(plan.expert_ids_TK[:, 0], greedy.compute_logits(x).argmax(-1))
    assert greedy.is_causal and not greedy.train().is_causal
    balanced = _build("base_layers", num_experts=4, eval_routing="balanced").eval()
    assert balanced(x).expert_load.tolist() == [10, 10, 10, 10]


def test_base_leaves_padding_out_of_the_assignment():
    router = _build("base_layers", num_experts=4).train()
    x = torch.randn(13, D, generator=_gen(8))
    mask = torch.ones(13, dtype=torch.bool)
    mask[[1, 4, 7]] = False
    plan = router(x, mask)
    assert plan.expert_load.tolist() == [3, 3, 2, 2]
    assert not plan.keep_TK[~mask].any() and (plan.weights_TK[~mask] == 0).all()


def test_base_needs_one_expert_per_token():
    with pytest.raises(ValueError, match="k must be 1"):
        _build("base_layers", k=2)


# ------------------------------------------------------------------------------- expert choice


def test_each_expert_takes_exactly_its_capacity():
    router = _build("expert_choice", num_experts=4, capacity_factor=1.5).train()
    plan = router(torch.randn(20, D, generator=_gen(9)))
    C = math.ceil(20 * 1.5 / 4)
    assert plan.capacity == C
    assert plan.expert_load.tolist() == [C] * 4
    assert plan.expert_ids_TK.shape == (20, 4)


def test_expert_choice_capacity_counts_valid_tokens_only():
    router = _build("expert_choice", num_experts=4).eval()
    x = torch.randn(20, D, generator=_gen(10))
    mask = torch.tensor([True] * 14 + [False] * 6)
    plan = router(x, mask)
    assert plan.capacity == math.ceil(14 * 2 / 4)
    assert plan.expert_load.tolist() == [7] * 4
    assert not plan.keep_TK[~mask].any()


def test_expert_choice_weights_are_the_affinities_and_tokens_get_zero_or_many_experts():
    router = _build("expert_choice", num_experts=4, capacity_factor=1.0).train()
    x = torch.randn(32, D, generator=_gen(11))
    plan = router(x)
    probs = router.compute_logits(x).softmax(-1)
    torch.testing.assert_close(plan.weights_TK, torch.where(plan.keep_TK, probs, torch.zeros_like(probs)))
    per_token = plan.keep_TK.sum(-1)
    assert per_token.min() == 0 and per_token.max() >= 2  # some tokens get none, some several
    slot = torch.arange(4).expand(32, 4)
    assert torch.equal(plan.expert_ids_TK, torch.where(plan.keep_TK, slot, -1))


def test_expert_choice_warns_that_it_is_not_causal():
    with pytest.warns(UserWarning, match="not causal"):
        router = impls.build_router("expert_choice", d_model=D, num_experts=4)
    assert router.causal is False and not router.eval().is_causal


def test_a_later_token_changes_an_earlier_tokens_expert_choice_routing():
    router = _build("expert_choice", num_experts=2, capacity_factor=1.0).eval()
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0], router.gate.weight[1, 0] = 1.0, -1.0  # logits +-x0
    x = torch.zeros(4, D)
    x[:, 0] = torch.tensor([3.0, 2.0, 1.0, 0.0])
    before = router(x)  # expert 0 keeps tokens 0 and 1
    x[3, 0] = 10.0  # only the LAST token changes
    after = router(x)
    assert before.keep_TK[1, 0] and not after.keep_TK[1, 0]  # token 1 lost expert 0
    assert not torch.equal(before.weights_TK[:3], after.weights_TK[:3])


def test_brainformer_preset_is_expert_choice_with_capacity_factor_two():
    router = _build("brainformer", num_experts=4)
    assert isinstance(router, impls.ROUTERS["expert_choice"]) and router.config.capacity_factor == 2.0


# ------------------------------------------------------------------------------- balance under skew

BOUNDS = {
    "sinkhorn_ot": 1.5,
    "s_base": 1.5,
    "ssr": 1.5,
    "base_layers": 1.0,
    "bip_balancing": 1.15,
}


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_balancing_routers_bound_the_max_load_where_plain_topk_collapses(name):
    E, T = 8, 512
    opts = {"sinkhorn_prob": 1.0} if name == "ssr" else {}
    router = _build(name, num_experts=E, router_bias=True, **opts).train()
    with torch.no_grad():
        router.gate.bias.zero_()
        router.gate.bias[0] = 8.0  # every token's logit for expert 0 is 8 higher
    x = torch.randn(T, D, generator=_gen(12))
    load = router(x).expert_load
    k = router.config.k
    assert load.max() <= BOUNDS[name] * load.mean() + 1e-6, load.tolist()
    # the same logits under plain top-k (inline torch.topk): every token picks expert 0
    topk = router.compute_logits(x).topk(k, dim=-1).indices
    plain = torch.bincount(topk.flatten(), minlength=E).float()
    assert plain[0] == T and plain.max() / plain.mean() == E / k


# ------------------------------------------------------------------------------- S-BASE / SSR / OT


def test_s_base_selects_from_the_plan_and_weighs_with_the_sigmoid_gate():
    router = _build("s_base", num_experts=4).train()
    x = torch.randn(40, D, generator=_gen(13))
    plan = router(x)
    logits = router.compute_logits(x).detach()
    ref = sinkhorn(logits, epsilon=1.0, tol=1e-4, max_iters=100)
    assert torch.equal(plan.expert_ids_TK, ref.plan.topk(1, dim=-1).indices)
    torch.testing.assert_close(plan.weights_TK, logits.sigmoid().gather(1, plan.expert_ids_TK))
    assert float(plan.info["sinkhorn_marginal_error"]) < 1e-4
    assert dict(plan.losses) == {}


def test_s_base_top2_uses_unnormalized_softmax_gates_and_plain_topk_at_inference():
    router = _build("s_base", num_experts=4, k=2).eval()
    x = torch.randn(40, D, generator=_gen(14))
    plan = router(x)
    probs = router.compute_logits(x).softmax(-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(plan.expert_ids_TK, top.indices)
    torch.testing.assert_close(plan.weights_TK, top.values)
    assert "sinkhorn_iterations" not in plan.info and router.is_causal


def test_ssr_step_selection_is_deterministic_and_hits_the_requested_fraction():
    a = _build("ssr", sinkhorn_prob=0.05, seed=3)
    b = _build("ssr", sinkhorn_prob=0.05, seed=3)
    steps = [a.uses_sinkhorn(s) for s in range(4000)]
    assert steps == [b.uses_sinkhorn(s) for s in range(4000)]
    assert 0.035 < sum(steps) / 4000 < 0.065
    assert steps != [_build("ssr", sinkhorn_prob=0.05, seed=4).uses_sinkhorn(s) for s in range(4000)]


def test_ssr_counts_training_steps_only_and_keeps_the_count_in_its_state():
    router = _build("ssr", sinkhorn_prob=0.5, seed=1)
    x = torch.randn(24, D, generator=_gen(15))
    used = [bool(router.train()(x).info["sinkhorn_used"]) for _ in range(10)]
    assert used == [router.uses_sinkhorn(s) for s in range(10)] and router.step == 10
    assert not router.eval()(x).info["sinkhorn_used"] and router.step == 10
    other = _build("ssr", sinkhorn_prob=0.5, seed=1)
    other.load_state_dict(router.state_dict())
    assert other.step == 10
    other.set_step(3)
    assert other.step == 3


def test_ssr_sinkhorn_steps_take_gates_from_the_plan_renormalized_over_k():
    router = _build("ssr", sinkhorn_prob=1.0).train()  # k = 2, epsilon = 0.3
    x = torch.randn(48, D, generator=_gen(16))
    plan = router(x)
    logits = router.compute_logits(x)
    ref = sinkhorn(logits, epsilon=router.config.epsilon, tol=1e-4, max_iters=100).plan
    top = ref.topk(2, dim=-1)
    assert torch.equal(plan.expert_ids_TK, top.indices)
    torch.testing.assert_close(plan.weights_TK, top.values / top.values.sum(-1, keepdim=True))
    assert bool(plan.info["sinkhorn_used"])


def test_sinkhorn_ot_routes_on_the_plan_at_inference_unless_asked_for_topk():
    x = torch.randn(32, D, generator=_gen(17))
    ot = _build("sinkhorn_ot").eval()
    plan = ot(x)
    assert "sinkhorn_iterations" in plan.info and not ot.is_causal
    topk = _build("sinkhorn_ot", eval_routing="topk").eval()
    assert topk.is_causal and "sinkhorn_iterations" not in topk(x).info


def test_sinkhorn_ot_weights_carry_gradient_through_the_iterations():
    router = _build("sinkhorn_ot", k=2).train()
    x = torch.randn(32, D, generator=_gen(18))
    plan = router(x)
    (plan.weights_TK * torch.rand(32, 2, generator=_gen(19))).sum().backward()
    assert router.gate.weight.grad.abs().sum() > 0
    frozen = _build("sinkhorn_ot", k=2, differentiable=False).train()
    assert not frozen(x).weights_TK.requires_grad


# ------------------------------------------------------------------------------- BIP


def test_bip_keeps_combine_weights_unbiased_and_q_in_float32():
    router = _build("bip_balancing", num_experts=8, k=2, router_bias=True).train()
    with torch.no_grad():
        router.gate.bias[0] = 8.0
    x = torch.randn(256, D, generator=_gen(20))
    plan = router(x)
    assert router.q[0] > 0.5  # the over-demanded expert gets a large correction
    s = router.compute_logits(x).softmax(-1)
    w = s.gather(1, plan.expert_ids_TK)
    torch.testing.assert_close(plan.weights_TK, w / w.sum(-1, keepdim=True))
    # the duals make exact ties at the k-th score; they go to the lower expert index on every device
    assert torch.equal(plan.expert_ids_TK, impls.functional.topk(s - router.q, 2)[1])
    router = router.to(torch.bfloat16)
    assert router.q.dtype == torch.float32 and router.gate.weight.dtype == torch.bfloat16
    router(x.bfloat16())


def test_bip_updates_q_in_training_only():
    router = _build("bip_balancing", num_experts=8, router_bias=True).train()
    with torch.no_grad():
        router.gate.bias[0] = 8.0
    x = torch.randn(128, D, generator=_gen(21))
    router.eval()(x)
    assert (router.q == 0).all()
    router.train()(x)
    q = router.q.clone()
    assert (q > 0).any()
    router.eval()(torch.randn(128, D, generator=_gen(22)))
    assert torch.equal(router.q, q)


# ------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("sinkhorn_ot", {"epsilon": 0.0}, "epsilon"),
        ("sinkhorn_ot", {"gate": "relu"}, "gate"),
        ("s_base", {"sinkhorn_iters": 0}, "sinkhorn_iters"),
        ("ssr", {"sinkhorn_prob": 1.5}, "sinkhorn_prob"),
        ("sinkhorn_ot", {"cost": "cosine"}, "cost"),
        ("bip_balancing", {"bip_iters": 0}, "bip_iters"),
        ("expert_choice", {"capacity_factor": None}, "capacity_factor"),
        ("expert_choice", {"k": 2}, "k must be 1"),
        ("base_layers", {"auction_eps": 0.0}, "auction_eps"),
    ],
)
def test_bad_options_are_rejected_by_name(name, options, match):
    with pytest.raises(ValueError, match=match):
        _build(name, **options)
