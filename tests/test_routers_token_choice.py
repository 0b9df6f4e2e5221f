"""Per-paper properties of the token-choice routers on hand-checked tiny cases (8 tokens, 4 experts)."""

from __future__ import annotations

import math

import pytest
import torch

import impls
from impls.functional import expert_counts
from impls.routers.dense.dense_softmax import dense_to_sparse_temperature


def with_logits(name: str, logits_TE: torch.Tensor, **options) -> tuple[impls.Router, torch.Tensor]:
    """A router whose gate produces exactly ``logits_TE`` for the returned one-hot tokens."""
    T, E = logits_TE.shape
    router = impls.build_router(name, d_model=T, num_experts=E, **options)
    with torch.no_grad():
        router.gate.weight.copy_(logits_TE.T)
    return router, torch.eye(T)


def round_robin_logits(T: int = 8, E: int = 4, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.nn.functional.one_hot(torch.arange(T) % E, E).float()


def softmax_row(*v: float) -> torch.Tensor:
    return torch.softmax(torch.tensor(v), -1)


# ---------------------------------------------------------------------------------- Switch / ST-MoE


def test_switch_loss_is_exactly_one_for_a_perfectly_balanced_router() -> None:
    router, x = with_logits("switch", round_robin_logits())
    plan = router.eval()(x)
    assert plan.expert_load.tolist() == [2, 2, 2, 2]
    assert abs(plan.losses["load_balance"].item() - 1.0) < 1e-6


def test_switch_loss_hand_value_when_every_token_picks_expert_zero() -> None:
    logits = torch.tensor([[2.0, 0, 0, 0]]).repeat(8, 1)
    router, x = with_logits("switch", logits)
    plan = router.eval()(x)
    p0 = math.exp(2) / (math.exp(2) + 3)
    assert plan.losses["load_balance"].item() == pytest.approx(4 * p0, rel=1e-6)


def test_router_z_loss_is_the_mean_squared_logsumexp() -> None:
    logits = torch.tensor([[2.0, 0, 0, 0]] * 4 + [[0.0, 0, 0, 0]] * 4)
    router, x = with_logits("switch", logits)
    z = router.eval()(x).losses["z_loss"].item()
    assert z == pytest.approx((math.log(math.exp(2) + 3) ** 2 + math.log(4) ** 2) / 2, rel=1e-6)


def test_switch_capacity_keeps_the_first_tokens_and_zeroes_the_rest() -> None:
    logits = torch.tensor([[2.0, 0, 0, 0]]).repeat(8, 1)
    router, x = with_logits("switch", logits, capacity_factor=0.5)
    dropless, _ = with_logits("switch", logits)
    plan = router.train()(x)
    assert plan.capacity == 1  # ceil(0.5 * 8 / 4)
    assert plan.keep_TK[:, 0].tolist() == [True] + [False] * 7
    assert plan.fraction_dropped.item() == pytest.approx(7 / 8)
    assert (plan.weights_TK[1:] == 0).all() and plan.weights_TK[0, 0] > 0
    assert plan.losses["load_balance"] == dropless.train()(x).losses["load_balance"]


def test_st_moe_serves_every_first_choice_before_any_second_choice() -> None:
    first_0 = [3.0, 2.0, 0, 0]  # tokens 0-3: expert 0 then expert 1
    first_1 = [2.0, 3.0, 0, 0]  # tokens 4-7: expert 1 then expert 0
    logits = torch.tensor([first_0] * 4 + [first_1] * 4)
    router, x = with_logits("switch", logits, k=2, capacity_factor=1.0)
    plan = router.train()(x)
    assert plan.capacity == 4  # ceil(1.0 * 2 * 8 / 4)
    # every token keeps its first choice; every second choice finds its expert full
    assert plan.keep_TK[:, 0].all() and not plan.keep_TK[:, 1].any()
    assert plan.expert_load.tolist() == [4, 4, 0, 0]


def test_switch_weights_are_raw_probabilities() -> None:
    router, x = with_logits("switch", torch.tensor([[2.0, 1.0, 0, 0]] * 8), k=2)
    plan = router.eval()(x)
    torch.testing.assert_close(plan.weights_TK[0], softmax_row(2.0, 1.0, 0, 0)[:2])


# ---------------------------------------------------------------------------------- GShard


def test_gshard_loss_counts_first_choices_only() -> None:
    # first choices round-robin, second choices all on expert (first + 1) % 4 -> also balanced, but
    # make second choices skewed: tokens 0..7 second choice = expert 3 unless first is 3
    logits = round_robin_logits(scale=3.0)
    logits[:, 3] += 1.0
    router, x = with_logits("gshard", logits)
    plan = router.eval()(x)
    assert abs(plan.losses["load_balance"].item() - 1.0) < 1e-6
    switch_style = impls.load_balance_loss(plan.scores_TE, plan.expert_ids_TK)
    assert abs(switch_style.item() - 1.0) > 1e-3  # counting both choices would differ


def test_gshard_renormalizes_the_two_gates() -> None:
    router, x = with_logits("gshard", torch.tensor([[2.0, 1.0, 0, 0]] * 8))
    plan = router.eval()(x)
    e = math.e
    torch.testing.assert_close(plan.weights_TK[0], torch.tensor([e / (e + 1), 1 / (e + 1)]))


def test_gshard_random_policy_keeps_the_second_expert_with_probability_2g2() -> None:
    # g1 = 0.75, g2 = 0.25 after renormalization -> kept with probability 2 * 0.25 = 0.5
    logits = torch.log(torch.tensor([[0.6, 0.2, 0.1, 0.1]])).repeat(4000, 1)
    router = impls.build_router("gshard_top2", d_model=4, num_experts=4, capacity_factor=None)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    torch.manual_seed(0)
    plan = router.train()(logits)
    kept = (plan.expert_ids_TK[:, 1] >= 0).float().mean().item()
    assert kept == pytest.approx(0.5, abs=0.03)
    assert (plan.weights_TK[plan.expert_ids_TK[:, 1] < 0, 1] == 0).all()
    router.eval()
    assert (router(logits).expert_ids_TK[:, 1] >= 0).all()  # eval: always dispatched


def test_gshard_skipped_second_choices_take_no_capacity() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.2, 0.1, 0.1]])).repeat(8, 1)
    router = impls.build_router("gshard", d_model=4, num_experts=4, second_policy="none")
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    plan = router.train()(logits)
    assert plan.fraction_dropped.item() == pytest.approx(
        4 / 8
    )  # capacity 4 on expert 0, no drop counted for -1
    assert (plan.expert_ids_TK[:, 1] == -1).all()


def test_gshard_is_top2_only() -> None:
    with pytest.raises(ValueError, match="top-2"):
        impls.build_router("gshard", d_model=4, num_experts=4, k=1)


# ---------------------------------------------------------------------------------- Shazeer / V-MoE / M6-T


def test_noisy_topk_importance_is_cv_squared_of_summed_gates() -> None:
    logits = torch.tensor([[2.0, 1.0, 0, 0]] * 6 + [[0, 0, 1.0, 2.0]] * 2)
    router, x = with_logits("noisy_topk", logits, k=2)
    plan = router.eval()(x)
    g = softmax_row(2.0, 1.0)
    importance = torch.tensor([6 * g[0], 6 * g[1], 2 * g[1], 2 * g[0]])
    expected = importance.var(unbiased=False) / importance.mean() ** 2
    assert plan.losses["importance"].item() == pytest.approx(expected.item(), rel=1e-5)
    load = torch.tensor([6.0, 6, 2, 2])
    assert plan.losses["load"].item() == pytest.approx(
        (load.var(unbiased=False) / load.mean() ** 2).item(), rel=1e-5
    )


def test_noisy_topk_smooth_load_estimates_the_expected_counts() -> None:
    torch.manual_seed(0)
    router = impls.build_router("noisy_topk", d_model=8, num_experts=6, k=2, zero_init=False).train()
    x = torch.randn(6000, 8)
    plan = router(x)
    smooth = plan.info["load_E"]
    counts = expert_counts(plan.expert_ids_TK, 6)
    torch.testing.assert_close(smooth, counts, rtol=0.08, atol=30)


def test_noisy_topk_rejects_k_one() -> None:
    with pytest.raises(ValueError, match="k >= 2"):
        impls.build_router("noisy_topk", d_model=4, num_experts=4, k=1)


def test_vmoe_batch_prioritized_routing_drops_the_least_confident_tokens() -> None:
    logits = torch.tensor([[1.0, 0, 0, 0], [3.0, 0, 0, 0], [2.0, 0, 0, 0], [4.0, 0, 0, 0]])
    router, x = with_logits("vmoe_topk", logits, k=1, capacity_factor=2.0, drop_policy="probability")
    plan = router.eval()(x)
    assert plan.capacity == 2
    assert plan.keep_TK[:, 0].tolist() == [False, True, False, True]
    by_position, _ = with_logits("vmoe_topk", logits, k=1, capacity_factor=2.0)
    assert by_position.eval()(x).keep_TK[:, 0].tolist() == [True, True, False, False]


def test_vmoe_noise_std_is_one_over_num_experts() -> None:
    E = 8
    router = impls.build_router("vmoe_topk", d_model=4, num_experts=E, k=2)
    with torch.no_grad():
        router.gate.weight.zero_()
    torch.manual_seed(0)
    plan = router.train()(torch.randn(20000, 4))
    log_p = plan.scores_TE.log()
    centered = log_p - log_p.mean(-1, keepdim=True)  # = sigma * (eps - mean eps)
    sigma = centered.std() / math.sqrt(1 - 1 / E)
    assert sigma.item() == pytest.approx(1 / E, rel=0.03)


def test_expert_prototyping_routes_top1_inside_each_prototype() -> None:
    router, x = with_logits("expert_prototyping", torch.tensor([[2.0, 0.0, 0.0, 1.0]] * 8), k=2)
    plan = router.eval()(x)
    assert plan.expert_ids_TK[0].tolist() == [0, 3]
    e = math.e
    torch.testing.assert_close(plan.weights_TK[0], torch.tensor([e**2 / (e**2 + 1), e / (e + 1)]))
    balanced, xb = with_logits("expert_prototyping", round_robin_logits(), k=2)
    assert abs(balanced.eval()(xb).losses["load_balance"].item() - 1.0) < 1e-6


# ---------------------------------------------------------------------------------- dropless top-k


def test_mixtral_weights_are_renormalized_over_the_chosen_experts() -> None:
    router, x = with_logits("topk", torch.tensor([[2.0, 1.0, 0, 0]] * 8), k=2)
    plan = router.eval()(x)
    e = math.e
    torch.testing.assert_close(plan.weights_TK[0], torch.tensor([e / (e + 1), 1 / (e + 1)]))
    assert abs(with_logits("topk", round_robin_logits(), k=2)[0].eval()(x).losses["load_balance"] - 1) < 1e-6


def test_softmax_before_and_after_topk_give_the_same_routing() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    before = impls.build_router("topk", d_model=16, num_experts=8, k=3)
    after = impls.build_router("topk", d_model=16, num_experts=8, k=3, softmax_order="after")
    after.load_state_dict(before.state_dict())
    a, b = before.eval()(x), after.eval()(x)
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    torch.testing.assert_close(a.weights_TK, b.weights_TK)


def test_qwen_style_weights_are_raw_probabilities() -> None:
    router, x = with_logits("topk", torch.tensor([[2.0, 1.0, 0, 0]] * 8), k=2, normalize=False)
    plan = router.eval()(x)
    torch.testing.assert_close(plan.weights_TK[0], softmax_row(2.0, 1.0, 0, 0)[:2])


def test_dbrx_p_norm_normalizes_the_kept_weights() -> None:
    torch.manual_seed(0)
    router = impls.build_router("topk", d_model=16, num_experts=16, k=4, norm_p=2.0)
    w = router.eval()(torch.randn(10, 16)).weights_TK
    torch.testing.assert_close(w.norm(dim=-1), torch.ones(10))


def test_skywork_logit_normalization_standardizes_then_scales() -> None:
    logits = torch.tensor([[4.0, 2.0, 1.0, 1.0]] * 8)
    router, x = with_logits("topk", logits, k=2, logit_norm_scale=2.0)
    scaled, _ = with_logits("topk", 10 * logits, k=2, logit_norm_scale=2.0)
    plan = router.eval()(x)
    h = logits[0]
    expected = torch.softmax(2.0 * (h - h.mean()) / h.std(unbiased=False), -1)
    torch.testing.assert_close(plan.scores_TE[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scaled.eval()(x).scores_TE, plan.scores_TE, atol=1e-5, rtol=1e-5)


def test_preset_options_and_coefficients_follow_the_papers() -> None:
    assert impls.build_router("mixtral_8x7b", d_model=4).config.k == 2
    dbrx = impls.build_router("dbrx", d_model=4)
    assert (dbrx.num_experts, dbrx.config.k) == (16, 4)
    assert impls.PRESETS["switch_base"].loss_coefficients == {"load_balance": 1e-2}
    assert impls.PRESETS["st_moe"].loss_coefficients == {"load_balance": 1e-2, "z_loss": 1e-3}
    v3 = impls.build_router("deepseek_v3", d_model=4)
    assert (v3.num_experts, v3.config.k, v3.config.routed_scaling_factor) == (256, 8, 2.5)


# ---------------------------------------------------------------------------------- dynamic top-p


@pytest.mark.parametrize(("p", "n"), [(0.4, 1), (0.6, 2), (0.85, 3), (1.0, 4)])
def test_top_p_keeps_the_fewest_experts_reaching_p(p: float, n: int) -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    router, x = with_logits("top_p", probs.log().repeat(8, 1), top_p=p)
    plan = router.eval()(x)
    assert (plan.expert_ids_TK[0] >= 0).sum().item() == n
    assert plan.expert_ids_TK[0, :n].tolist() == list(range(n))
    torch.testing.assert_close(plan.weights_TK[0, :n], probs[:n])
    h = -(probs * probs.log()).sum()
    assert plan.losses["entropy"].item() == pytest.approx(h.item(), rel=1e-5)


def test_top_p_max_k_caps_the_slots() -> None:
    router, x = with_logits("top_p", torch.zeros(8, 4), top_p=1.0, max_k=2)
    plan = router.eval()(x)
    assert plan.slots == 2 and (plan.expert_ids_TK >= 0).all()


# ---------------------------------------------------------------------------------- DeepSeek


def test_deepseek_v3_gates_are_renormalized_sigmoids_times_the_routed_scale() -> None:
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.0]] * 8)
    router, x = with_logits(
        "deepseek", logits, k=2, score_func="sigmoid", normalize=True, routed_scaling_factor=2.5
    )
    plan = router.eval()(x)
    s = torch.sigmoid(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(plan.weights_TK[0], 2.5 * s / s.sum())
    assert router.combine_normalization == 2.5


def test_v2_group_limited_routing_uses_the_best_expert_of_each_group() -> None:
    # 4 groups of 2; group maxima 0.9, 0.5, 0.8, 0.1 -> groups 0 and 2 survive (topk_group=2)
    probs = torch.tensor([[0.9, 0.0, 0.5, 0.45, 0.8, 0.0, 0.1, 0.0]])
    router, x = with_logits("deepseek", probs.log().clamp_min(-30).repeat(8, 1), k=3, n_group=4, topk_group=2)
    plan = router.eval()(x)
    chosen = set(plan.expert_ids_TK[0].tolist())
    # experts 2 (0.5) and 3 (0.45) beat 1 and 5 (~0) but their group lost: never chosen
    assert {0, 4} <= chosen <= {0, 1, 4, 5}


def test_sequence_level_loss_sees_imbalance_inside_sequences() -> None:
    # sequence A: experts 0,1,2,3 ; sequence B: all expert 0 -> batch f = [5,1,1,1]/8
    logits = torch.cat([round_robin_logits(4, 4, 5.0), torch.tensor([[5.0, 0, 0, 0]] * 4)])
    router, x = with_logits("deepseek", logits, k=1)
    plan = router.eval()(x, sequence_length=4)
    P = plan.scores_TE
    seq_a = 4 * (torch.full((4,), 0.25) * P[:4].mean(0)).sum()
    seq_b = 4 * P[4:, 0].mean()
    assert plan.losses["seq_load_balance"].item() == pytest.approx(((seq_a + seq_b) / 2).item(), rel=1e-6)
    f = torch.tensor([5.0, 1, 1, 1]) / 8
    assert plan.losses["load_balance"].item() == pytest.approx((4 * (f * P.mean(0)).sum()).item(), rel=1e-6)


def test_v2_device_and_communication_losses_are_one_when_balanced() -> None:
    router, x = with_logits("deepseek", round_robin_logits(), k=1, n_group=2, topk_group=1)
    plan = router.eval()(x)
    assert plan.losses["device_balance"].item() == pytest.approx(1.0, abs=1e-6)
    assert plan.losses["comm_balance"].item() == pytest.approx(1.0, abs=1e-6)


def test_expert_bias_updates_reduce_imbalance_on_a_skewed_stream() -> None:
    torch.manual_seed(0)
    E = 8
    router = impls.build_router(
        "deepseek",
        d_model=16,
        num_experts=E,
        k=2,
        score_func="sigmoid",
        normalize=True,
        aux_free_bias=True,
        bias_update_rate=0.01,
    ).train()
    centre = torch.randn(16)

    def max_violation(plan) -> float:
        load = expert_counts(plan.expert_ids_TK, E)
        return (load.max() / load.mean() - 1).item()

    def batch() -> torch.Tensor:
        return centre + 0.5 * torch.randn(256, 16)  # every token looks alike: a skewed stream

    start = max_violation(router(batch()))
    router.update_bias()
    for _ in range(150):
        router(batch())
        router.update_bias()
    end = max_violation(router(batch()))
    assert start > 1.0 and end < 0.5 * start, (start, end)


# ---------------------------------------------------------------------------------- dense gates


def test_dense_gate_weights_every_expert_by_the_softmax() -> None:
    router, x = with_logits("dense_softmax", torch.tensor([[2.0, 1.0, 0, 0]] * 8))
    plan = router.eval()(x)
    assert plan.expert_ids_TK[0].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(plan.weights_TK[0], softmax_row(2.0, 1.0, 0, 0))


def test_mmoe_tasks_have_their_own_gates_over_the_same_experts() -> None:
    torch.manual_seed(0)
    router = impls.build_router("mmoe", d_model=8, num_experts=4).eval()
    plans = router.route_tasks(torch.randn(6, 8))
    assert len(plans) == 2 and plans[0].info["task"] == 0 and plans[1].info["task"] == 1
    assert torch.equal(plans[0].expert_ids_TK, plans[1].expert_ids_TK)
    assert not torch.allclose(plans[0].weights_TK, plans[1].weights_TK)


def test_ds_moe_trains_dense_and_infers_sparse() -> None:
    torch.manual_seed(0)
    router = impls.build_router("ds_moe", d_model=8, num_experts=6)
    x = torch.randn(5, 8)
    assert router.train()(x).experts_per_token.item() == 6
    assert router.eval()(x).experts_per_token.item() == 2


def test_mutual_information_loss_rewards_confident_balanced_gates() -> None:
    uniform, x = with_logits("dense_softmax", torch.zeros(8, 4))
    assert abs(uniform.eval()(x).losses["mutual_information"].item()) < 1e-6
    confident, x = with_logits("dense_softmax", round_robin_logits(scale=30.0))
    assert confident.eval()(x).losses["mutual_information"].item() == pytest.approx(-math.log(4), abs=1e-4)


def test_evomoe_temperature_anneals_and_the_threshold_sparsifies() -> None:
    assert dense_to_sparse_temperature(0, 100) == pytest.approx(2.0)
    assert dense_to_sparse_temperature(100, 100) == pytest.approx(0.3)
    assert dense_to_sparse_temperature(50, 100) < dense_to_sparse_temperature(10, 100)
    torch.manual_seed(0)
    router = impls.build_router("evomoe", d_model=8, num_experts=8).train()
    x = torch.randn(64, 8)
    hot = router(x).experts_per_token
    router.temperature = 0.05
    cold = router(x).experts_per_token
    assert cold < hot and cold >= 1


# ---------------------------------------------------------------------------- device-independent top-k


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_breaks_ties_towards_the_lower_expert_index(k: int) -> None:
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 3.0, -2.0], [float("-inf"), 2.0, 2.0, 2.0]])
    values, ids = impls.functional.topk(x, k)
    expected = torch.tensor([[0, 1, 2], [1, 2, 0], [1, 2, 3]])[:, :k]
    assert torch.equal(ids, expected)
    assert torch.equal(values, x.gather(1, expected))


def test_topk_equals_torch_topk_without_ties_and_passes_gradients() -> None:
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(5), requires_grad=True)
    values, ids = impls.functional.topk(x, 4)
    ref = torch.topk(x, 4, dim=-1)
    assert torch.equal(ids, ref.indices) and torch.equal(values, ref.values)
    values.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x).scatter(1, ids, 1.0))


def test_zero_initialized_noisy_gate_routes_ties_to_the_first_experts_in_eval() -> None:
    router = impls.build_router("noisy_topk", d_model=8, num_experts=6, k=2).eval()
    plan = router(torch.randn(5, 8))
    assert torch.equal(plan.expert_ids_TK, torch.tensor([[0, 1]] * 5))
