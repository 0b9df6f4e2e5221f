"""Routing-Free MoE: self-scored experts on hand-checked values, the balance losses (Eq. 13-15), the
adaptive coefficient (Eq. 17) steering the density to its target, and the layer against a per-expert
restatement of Eq. 6, 9 and 10."""

from __future__ import annotations

import pytest
import torch

import impls
from impls.routers.token_choice.routing_free import (
    ROUTING_FREE_S,
    RoutingFreeMoE,
    RoutingFreeRouter,
    routing_free_balance,
)


def hand_router():
    r = RoutingFreeRouter(2, 3, rank=2, threshold=1.0)
    with torch.no_grad():
        r.proj.copy_(torch.stack([torch.eye(2), 2 * torch.eye(2), 0.5 * torch.eye(2)]))
        r.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    return r


def test_scores_and_activations_on_hand_checked_values():
    r = hand_router()
    x = torch.tensor([[3.0, 4.0], [0.6, 0.8]])  # norms 5 and 1
    plan = r(x)
    # G = ReLU(||x A_i|| - b_i): token 0 -> [5, 9, 2.5], token 1 -> [1, 1, 0.5]; active where G >= 1
    G = torch.tensor([[5.0, 9.0, 2.5], [1.0, 1.0, 0.5]])
    torch.testing.assert_close(plan.scores_TE, G / G.sum(-1, keepdim=True))
    assert plan.keep_TK.tolist() == [[True, True, True], [True, True, False]]
    assert plan.expert_ids_TK.tolist() == [[0, 1, 2], [0, 1, -1]]
    torch.testing.assert_close(
        plan.weights_TK, torch.tensor([[5.0, 9.0, 2.5], [1.0, 1.0, 0.0]])
    )  # no softmax


def test_balance_losses_on_hand_checked_values():
    f = torch.tensor([[True, False], [True, True]])
    g = torch.tensor([[2.0, 0.5], [1.0, 3.0]])
    # proxy f*G = [[2, 0], [1, 3]]; L_EB = mean_i(mean_x f * mean_x fG) = ((1 * 1.5) + (0.5 * 1.5)) / 2
    eb = (1.0 * 1.5 + 0.5 * 1.5) / 2
    # L_TB = mean_x(mean_i f * mean_i fG) = (0.5 * 1 + 1 * 2) / 2
    tb = (0.5 * 1.0 + 1.0 * 2.0) / 2
    torch.testing.assert_close(routing_free_balance(f, g, 1.0), torch.tensor(eb))
    torch.testing.assert_close(routing_free_balance(f, g, 0.0), torch.tensor(tb))
    torch.testing.assert_close(routing_free_balance(f, g, 0.5), torch.tensor(0.5 * eb + 0.5 * tb))


def test_coefficient_follows_eq17_and_is_capped():
    r = hand_router().train()
    r(torch.tensor([[3.0, 4.0]]))  # density 1 > 1/4
    r.on_optimizer_step()
    torch.testing.assert_close(r.balance_coefficient, torch.tensor(1e-10 * 1.02))
    r(torch.tensor([[0.0, 0.0]]))  # density 0 < 1/4
    r.on_optimizer_step()
    torch.testing.assert_close(r.balance_coefficient, torch.tensor(1e-10))
    r.on_optimizer_step()  # nothing counted: no change
    torch.testing.assert_close(r.balance_coefficient, torch.tensor(1e-10))
    r.balance_coefficient.fill_(0.999)
    r(torch.tensor([[3.0, 4.0]]))
    r.on_optimizer_step()
    assert float(r.balance_coefficient) == 1.0


def test_adaptive_balance_drives_the_density_to_its_target():
    torch.manual_seed(0)
    moe = RoutingFreeMoE(16, d_act=8, num_experts=8, rank=8, lambda_init=1e-3, lambda_step=0.2)
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    target = torch.randn(16, 16) / 4
    densities = []
    for _ in range(300):
        x = torch.randn(64, 16)
        h, plan = moe(x)
        loss = (h - x @ target).pow(2).mean() + plan.losses["expert_token_balance_adaptive"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        impls.step_routers(moe)
        densities.append(float(plan.info["density"]))
    assert densities[0] > 0.8  # nearly all experts start active
    late = sum(densities[-50:]) / 50
    assert abs(late - 0.25) < 0.1


def test_layer_matches_a_per_expert_restatement():
    torch.manual_seed(0)
    moe = RoutingFreeMoE(6, d_act=4, num_experts=3, rank=2, threshold=0.8)
    x = torch.randn(7, 6)
    h, _ = moe(x)
    r = moe.router
    ref = x.clone()
    for t in range(7):
        for i in range(3):
            xa = x[t] @ r.proj[i]
            G = torch.relu(xa.norm() - r.bias[i])
            if G >= 0.8:
                e = (torch.nn.functional.silu(xa @ moe.B[i]) * (x[t] @ moe.w_up[i])) @ moe.w_down[i]
                ref[t] = ref[t] + G * e
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-6)
    h.sum().backward()
    assert r.proj.grad.abs().sum() > 0 and r.bias.grad.abs().sum() > 0  # the score scales the output


def test_preset_and_validation():
    assert ROUTING_FREE_S.num_experts == 12 and ROUTING_FREE_S.options["rank"] == 32
    assert ROUTING_FREE_S.loss_coefficients == {"expert_token_balance_adaptive": 1.0}
    with pytest.raises(ValueError, match="density_target"):
        RoutingFreeRouter(8, 4, density_target=0.0)
    with pytest.raises(ValueError, match="capacity"):
        RoutingFreeRouter(8, 4, capacity_factor=1.0)
    scaled = RoutingFreeRouter(8, 4, norm_scale=True)
    assert scaled.scale is not None and torch.all(scaled.scale == 1)
