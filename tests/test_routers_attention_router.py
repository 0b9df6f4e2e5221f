"""Yuan 2.0-M32's attention router against the paper's equations, restated per token."""

from __future__ import annotations

import pytest
import torch

import impls
from impls.routers.token_choice.attention_router import AttentionRouter


def yuan_reference(I, W, W1, W2):
    """Sec. 3 literally, one token at a time: Q, K, V in R^N, P = Softmax(Q K^T) V, top-2, softmax."""
    ids, weights = [], []
    for tok in I:
        Q, K, V = W @ tok, W1 @ tok, W2 @ tok
        P = torch.softmax(torch.outer(Q, K), dim=-1) @ V  # N x N attention among the experts
        top, idx = P.topk(2)
        ids.append(idx)
        weights.append(torch.softmax(top, 0))
    return torch.stack(ids), torch.stack(weights)


def test_attention_router_matches_the_paper_restated_per_token():
    torch.manual_seed(0)
    r = AttentionRouter(12, 6)
    x = torch.randn(30, 12)
    plan = r(x)
    ids, w = yuan_reference(x, r.query.weight, r.key.weight, r.value.weight)
    assert torch.equal(plan.expert_ids_TK, ids)
    torch.testing.assert_close(plan.weights_TK, w)
    torch.testing.assert_close(plan.weights_TK.sum(-1), torch.ones(30))


def test_hand_checked_scores_couple_the_experts():
    """With K = 0 every expert attends uniformly, so all experts get the mean of V: a tie."""
    r = AttentionRouter(2, 3)
    with torch.no_grad():
        r.query.weight.copy_(torch.tensor([[1.0, 0], [0, 1.0], [1.0, 1.0]]))
        r.key.weight.zero_()
        r.value.weight.copy_(torch.tensor([[3.0, 0], [0, 6.0], [0, 0]]))
    logits = r(torch.tensor([[1.0, 1.0]])).logits_TE
    torch.testing.assert_close(logits, torch.full((1, 3), 3.0))  # mean of V = (3, 6, 0)
    # a linear router would score expert 1 highest (V_1 = 6); here its score is pulled to the mean


def test_yuan_preset_and_k1_refusal():
    r = impls.build_router("yuan_2_m32", d_model=16)
    assert r.num_experts == 32 and r.config.k == 2
    assert impls.PRESETS["yuan_2_m32"].loss_coefficients == {}
    with pytest.raises(ValueError, match="k=1"):
        AttentionRouter(8, 4, k=1)
