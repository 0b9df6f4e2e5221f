"""SCMoE: strong and weak activation of one router, and the self-contrast decoding rule."""

from __future__ import annotations

import math

import pytest
import torch

import impls
from impls.oracle import moe_loop_reference
from impls.routers.token_choice.scmoe import SelfContrastRouter, self_contrast, weak_activation


def test_weak_activation_routes_each_token_to_its_rank_k_expert_with_weight_one():
    torch.manual_seed(0)
    r = SelfContrastRouter(8, 6, weak_rank=2)
    x = torch.randn(20, 8)
    probs = torch.softmax(x @ r.gate.weight.T, -1)
    second = probs.argsort(-1, descending=True)[:, 1]
    with weak_activation(r):
        plan = r(x)
        assert r.max_experts_per_token == 1
    assert torch.equal(plan.expert_ids_TK[:, 0], second)
    assert (plan.weights_TK == 1).all()
    assert r.activation == "strong"  # restored after the block
    strong = r(x)
    w, ids = probs.topk(2)
    assert torch.equal(strong.expert_ids_TK, ids)
    torch.testing.assert_close(strong.weights_TK, w / w.sum(-1, keepdim=True))


def test_strong_mode_is_the_plain_top2_layer():
    torch.manual_seed(0)
    layer = impls.MoELayer(16, 32, num_experts=4, router="scmoe")
    plain = impls.MoELayer(16, 32, num_experts=4, router="topk", k=2)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(layer(x)[0], plain(x)[0])
    with weak_activation(layer):
        weak, plan = layer(x)
    # the weak output is the rank-2 expert's own output, weight 1
    assert (plan.weights_TK == 1).all()
    with weak_activation(layer):
        reference, _ = moe_loop_reference(layer, x)
    torch.testing.assert_close(weak, reference)
    assert not torch.allclose(weak, plain(x)[0])


def test_contrast_strength_zero_leaves_the_strong_logits():
    torch.manual_seed(1)
    zs, zw = torch.randn(3, 50), torch.randn(3, 50)
    torch.testing.assert_close(self_contrast(zs, zw, beta=0.0, alpha=0.0), zs)
    s = self_contrast(zs, zw, beta=0.0, alpha=0.1)
    plausible = torch.isfinite(s)
    torch.testing.assert_close(s[plausible], zs[plausible])
    assert torch.equal(s.argmax(-1), zs.argmax(-1))


def test_contrast_and_plausibility_by_hand():
    zs = torch.tensor([[2.0, 1.0, 2.0 + math.log(0.05)]])  # token 2 is 0.05x as likely as token 0
    zw = torch.tensor([[3.0, -1.0, -5.0]])
    s = self_contrast(zs, zw, beta=0.5, alpha=0.1)
    assert s[0, 2] == float("-inf")  # outside V_head (0.05 < alpha = 0.1)
    torch.testing.assert_close(s[0, :2], torch.tensor([1.5 * 2 - 0.5 * 3, 1.5 * 1 + 0.5]))
    assert s.argmax().item() == 1  # the weak model's favourite is penalized: the contrast flips the choice
    with pytest.raises(ValueError, match="beta"):
        self_contrast(zs, zw, beta=-1.0)


def test_weak_activation_needs_an_scmoe_router():
    with (
        pytest.raises(ValueError, match="SelfContrastRouter"),
        weak_activation(impls.MoELayer(8, 16, num_experts=4, router="topk")),
    ):
        pass
    assert impls.PRESETS["scmoe_mixtral"].options == {"k": 2, "weak_rank": 2}
