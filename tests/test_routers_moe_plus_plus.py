"""MoE++: zero experts contribute exactly zero and copy experts the identity, constant experts mix the
token with a learned vector, the gating residual adds W_g times the previous logits, the balance loss
weights zero-computation experts by tau, and the layer equals a per-token loop."""

from __future__ import annotations

import pytest
import torch

from impls.routers.token_choice.moe_plus_plus import (
    MOE_PP,
    MoEPlusPlusLayer,
    MoEPlusPlusRouter,
    heterogeneous_balance_loss,
)


def loop_oracle(layer, x, plan):
    F = layer.router.num_ffn_experts
    c = layer.router.config.num_constant
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(plan.expert_ids_TK[t].tolist(), plan.weights_TK[t], strict=True):
            if e < F:
                y = layer.experts.expert_forward(e, x[t : t + 1])[0]
            elif e < F + c:
                a = torch.softmax(layer.const_gates[e - F] @ x[t], -1)
                y = a[0] * x[t] + a[1] * layer.const_vectors[e - F]
            elif e < F + c + layer.router.config.num_copy:
                y = x[t]
            else:
                y = torch.zeros_like(x[t])
            out[t] += w * y
    return out


def test_layer_equals_the_per_token_loop():
    torch.manual_seed(0)
    layer = MoEPlusPlusLayer(8, 16, num_ffn_experts=3)
    with torch.no_grad():
        layer.router.gate.weight.mul_(0.01)  # near-uniform: every expert kind gets picked
    x = torch.randn(64, 8)
    y, plan = layer(x)
    kinds = set(plan.expert_ids_TK.flatten().tolist())  # ffn 0-2, constant 3-4, copy 5, zero 6
    assert kinds & {0, 1, 2} and kinds & {3, 4} and {5, 6} <= kinds
    torch.testing.assert_close(y, loop_oracle(layer, x, plan), rtol=1e-5, atol=1e-6)


def test_zero_expert_gives_zero_and_copy_expert_the_identity():
    torch.manual_seed(0)
    layer = MoEPlusPlusLayer(4, 8, num_ffn_experts=2)  # ids: ffn 0-1, constant 2-3, copy 4, zero 5
    x = torch.randn(5, 4)
    x[:, 0] = 1.0  # a constant feature: the gate below gives every token the same logits
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, 0] = torch.tensor([-30.0, -30.0, -30.0, -30.0, 1.0, 2.0])
    y, plan = layer(x)  # every token: the zero expert first, then the copy expert
    assert plan.expert_ids_TK.tolist() == [[5, 4]] * 5
    p = torch.softmax(torch.tensor([-30.0, -30.0, -30.0, -30.0, 1.0, 2.0]), -1)
    torch.testing.assert_close(y, p[4] * x)  # the zero expert adds exactly nothing, the copy w * x


def test_gating_residual_adds_wg_times_previous_logits():
    torch.manual_seed(0)
    r = MoEPlusPlusRouter(4, 6)
    x = torch.randn(3, 4)
    prev = torch.randn(3, 6)
    plain = r(x).logits_TE
    with r.gating_residual(prev):
        res = r(x).logits_TE
    torch.testing.assert_close(res, plain + prev @ r.residual_map.weight.T)
    with pytest.raises(ValueError, match="gating residual"), r.gating_residual(torch.randn(2, 6)):
        r(x)


def test_balance_loss_weights_zero_computation_experts_by_tau():
    probs = torch.full((2, 4), 0.25)
    ids = torch.tensor([[0, 3], [1, 3]])  # expert 3 is zero-computation
    eta = torch.tensor([1.0, 1.0, 0.75, 0.75])
    # f = [1/4, 1/4, 0, 1/2]; 4 * (0.25 * 0.25 + 0.25 * 0.25 + 0.75 * 0.5 * 0.25)
    torch.testing.assert_close(
        heterogeneous_balance_loss(probs, ids, eta, None), torch.tensor(4 * (0.125 + 0.09375))
    )
    r = MoEPlusPlusRouter(4, 6)
    assert r.eta.tolist() == [1.0, 1.0, 0.75, 0.75, 0.75, 0.75]


def test_preset_and_validation():
    assert MOE_PP.num_experts == 20 and MOE_PP.options["tau"] == 0.75 and MOE_PP.options["k"] == 2
    with pytest.raises(ValueError, match="FFN expert"):
        MoEPlusPlusRouter(4, 4)
    mlp = MoEPlusPlusRouter(4, 6, gate="mlp")
    assert mlp.mlp[0].out_features == 48
