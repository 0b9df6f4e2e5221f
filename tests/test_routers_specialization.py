"""Guo et al. 2025: the orthogonality loss on hand-checked expert outputs, the routing variance, and the
layer helper computing the loss from the experts' own outputs in one pass."""

from __future__ import annotations

import torch

import impls
from impls.routers.token_choice.specialization import (
    EXPERT_SPECIALIZATION_DEEPSEEK,
    expert_orthogonality_loss,
    routing_variance,
    specialization_forward,
)


def test_orthogonality_loss_on_hand_checked_outputs():
    keep = torch.ones(1, 2, dtype=torch.bool)
    # y1 = (1, 0), y2 = (1, 1): ||proj_{y2} y1||^2 = 1/2, ||proj_{y1} y2||^2 = 1; sum / (K T) = 1.5 / 2
    y = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    torch.testing.assert_close(expert_orthogonality_loss(y, keep), torch.tensor(0.75))
    assert float(expert_orthogonality_loss(torch.tensor([[[2.0, 0.0], [0.0, 3.0]]]), keep)) == 0.0
    # K = 3 with y3 = y1 + y2 (orthonormal y1, y2): y3 lies in the others' span (2), y1 and y2 each
    # project onto span{y2, y3} fully (1 each): (1 + 1 + 2) / 3
    y = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]])
    torch.testing.assert_close(
        expert_orthogonality_loss(y, torch.ones(1, 3, dtype=torch.bool)), torch.tensor(4 / 3)
    )
    # an unkept slot is a zero vector: nothing to project onto
    assert float(expert_orthogonality_loss(y[:, :2] * 0 + 1, torch.tensor([[True, False]]))) == 0.0


def test_routing_variance_and_its_sign_in_the_plan():
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    # token 0: squared deviations 0.45^2 + 3 * 0.15^2 = 0.27, unbiased / 3 = 0.09; token 1: 0
    torch.testing.assert_close(routing_variance(p), torch.tensor(0.045))
    torch.manual_seed(0)
    r = impls.build_router("expert_specialization", d_model=8, num_experts=4, k=2)
    x = torch.randn(5, 8)
    plan = r(x)
    probs = torch.softmax(x @ r.gate.weight.T, -1)
    torch.testing.assert_close(plan.losses["variance"], -probs.var(-1).mean())  # maximized


def test_layer_helper_matches_the_layer_and_the_slot_outputs():
    torch.manual_seed(0)
    layer = impls.MoELayer(8, 16, router="expert_specialization", num_experts=4, k=2)
    x = torch.randn(2, 5, 8)
    out, plan, ortho = specialization_forward(layer, x)
    ref, _ = layer(x)
    torch.testing.assert_close(out, ref)
    x_TD = x.reshape(-1, 8)
    slots = torch.stack(
        [
            torch.stack([layer.experts.expert_forward(int(e), x_TD[t]) for e in plan.expert_ids_TK[t]])
            for t in range(10)
        ]
    )
    torch.testing.assert_close(ortho, expert_orthogonality_loss(slots, plan.keep_TK), rtol=1e-4, atol=1e-6)
    ortho.backward()
    assert layer.experts.w_in_EDF.grad.abs().sum() > 0


def test_preset():
    p = EXPERT_SPECIALIZATION_DEEPSEEK
    assert p.num_experts == 64 and p.options == {"k": 6} and p.layer["num_shared_experts"] == 2
    assert p.loss_coefficients == {"seq_load_balance": 0.001, "variance": 0.001}
