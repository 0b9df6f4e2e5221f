"""AdaMoE: null experts make the number of real experts per token vary, the weights are renormalized over
the true experts, and the balance loss averages the null experts' fractions (Sec. 3.3-3.4)."""

from __future__ import annotations

import pytest
import torch

import impls
from impls.routers.token_choice.adamoe import ADAMOE_MIXTRAL, AdaMoERouter, null_expert_balance_loss


def hand_router():
    r = AdaMoERouter(2, 2, k=2, num_null_experts=2, copy_init=False)
    with torch.no_grad():
        r.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        r.null_gate.weight.copy_(torch.tensor([[-1.0, 0.0], [0.0, -1.0]]))
    return r


def test_null_choices_leave_empty_slots_and_weights_renormalize_over_true_experts():
    r = hand_router()
    # token 0 logits [2, 0 | -2, 0]: top-2 = expert 0 and expert 1 (its logit 0 ties null 3's: the
    # lower index wins)
    # token 1 logits [-3, -3 | 3, 3]: both null -> no real expert, zero weights
    # token 2 logits [1, 2 | -1, -2]: experts 1 and 0, renormalized softmax weights
    x = torch.tensor([[2.0, 0.0], [-3.0, -3.0], [1.0, 2.0]])
    plan = r(x)
    assert plan.expert_ids_TK.tolist() == [[0, 1], [-1, -1], [1, 0]]
    assert plan.keep_TK.tolist() == [[True, True], [False, False], [True, True]]
    p = torch.softmax(torch.tensor([2.0, 0.0, -2.0, 0.0]), -1)
    torch.testing.assert_close(plan.weights_TK[0], p[:2] / p[:2].sum())
    assert float(plan.weights_TK[1].abs().sum()) == 0.0
    e = torch.exp(torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(plan.weights_TK[2], torch.stack([e[1], e[0]]) / e.sum())
    torch.testing.assert_close(plan.info["null_fraction"], torch.tensor(2 / 6))


def test_balance_loss_averages_the_null_fractions():
    probs = torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.1, 0.5, 0.1, 0.3]])
    ids = torch.tensor([[0, 2], [1, 3]])
    # f = [1/2, 1/2, 1/2, 1/2] (null ones averaged: still 1/2); P = [0.25, 0.3, 0.2, 0.25]
    torch.testing.assert_close(null_expert_balance_loss(probs, ids, 2), torch.tensor(4 * 0.5 * 1.0))
    ids = torch.tensor([[0, 2], [1, 2]])  # both nulls on expert 2: f = [1/2, 1/2, 1, 0] -> null mean 1/2
    torch.testing.assert_close(null_expert_balance_loss(probs, ids, 2), torch.tensor(4 * 0.5 * 1.0))
    ids = torch.tensor([[0, 1], [0, 1]])  # no nulls used: f = [1, 1, 0, 0]
    torch.testing.assert_close(null_expert_balance_loss(probs, ids, 2), torch.tensor(4 * (0.25 + 0.3)))


def test_copy_init_starts_null_logits_equal_to_real_ones_and_real_k_varies():
    torch.manual_seed(0)
    r = AdaMoERouter(16, 4, k=3, num_null_experts=4)
    torch.testing.assert_close(r.null_gate.weight, r.gate.weight)
    with torch.no_grad():
        r.null_gate.weight.add_(torch.randn(4, 16))
    plan = r(torch.randn(500, 16))
    real = plan.keep_TK.sum(-1)
    assert real.min() < 3 and real.max() == 3  # fewer real experts where nulls were chosen
    torch.testing.assert_close(plan.experts_per_token, real.float().mean())
    # the paper's rule: the mean real experts per token is k times the share of non-null slots
    torch.testing.assert_close(plan.experts_per_token, 3 * (1 - plan.info["null_fraction"]))


def test_preset_and_validation():
    assert ADAMOE_MIXTRAL.num_experts == 8
    assert ADAMOE_MIXTRAL.options == {"k": 3, "num_null_experts": 8}
    r = impls.build_router("adamoe_mixtral", d_model=16)
    assert r.null_gate.weight.shape == (8, 16)
    with pytest.raises(ValueError, match="k must be in"):
        AdaMoERouter(8, 2, k=5, num_null_experts=2)
    AdaMoERouter(8, 2, k=4, num_null_experts=2)  # k may exceed the true experts
