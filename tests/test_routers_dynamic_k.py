"""ReMoE and DynMoE (top-any): routers whose number of experts per token varies."""

from __future__ import annotations

import pytest
import torch

import impls
from impls.routers.token_choice.dynmoe import TopAnyRouter
from impls.routers.token_choice.remoe import ReMoERouter


# ---------------------------------------------------------------------------------- ReMoE
def test_remoe_gates_are_relu_values_and_the_l1_is_load_weighted():
    torch.manual_seed(0)
    r = ReMoERouter(6, 4, k=1)
    x = torch.randn(10, 6)
    plan = r(x)
    R = torch.relu(x @ r.gate.weight.T)  # Eq. 5
    active = R > 0
    assert torch.equal(plan.keep_TK, active)
    assert torch.equal(plan.expert_ids_TK, torch.where(active, torch.arange(4), -1))
    torch.testing.assert_close(plan.weights_TK, R)
    f = 4 / (1 * 10) * active.float().sum(0)  # Eq. 11
    torch.testing.assert_close(plan.losses["l1"], (R * f).sum() / 10)  # Eq. 10 (one layer)
    torch.testing.assert_close(plan.losses["l1_adaptive"], 1e-8 * plan.losses["l1"])
    plain = ReMoERouter(6, 4, k=1, load_weighted=False)
    plain.load_state_dict(r.state_dict())
    torch.testing.assert_close(plain(x).losses["l1"], R.sum(-1).mean())  # Eq. 9


def test_remoe_lambda_follows_eq7_once_per_optimizer_step():
    r = ReMoERouter(4, 4, k=1)  # target sparsity 0.75
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(4))
    dense = torch.ones(5, 4)  # every gate positive: sparsity 0 < 0.75 -> lambda * 1.2
    r(dense)
    r.on_optimizer_step()
    torch.testing.assert_close(r.l1_coefficient, torch.tensor(1.2e-8))
    r(-dense)  # every gate zero: sparsity 1 > 0.75 -> lambda / 1.2
    r.on_optimizer_step()
    torch.testing.assert_close(r.l1_coefficient, torch.tensor(1e-8))
    r(torch.tensor([[1.0, -1, -1, -1]]))  # sparsity exactly 0.75: sign 0, lambda kept
    r.on_optimizer_step()
    torch.testing.assert_close(r.l1_coefficient, torch.tensor(1e-8))
    r.on_optimizer_step()  # nothing counted since: no change
    torch.testing.assert_close(r.l1_coefficient, torch.tensor(1e-8))
    r.eval()
    r(dense)  # evaluation counts nothing
    r.on_optimizer_step()
    torch.testing.assert_close(r.l1_coefficient, torch.tensor(1e-8))


def _train_remoe(adapt: bool, steps: int = 500) -> list[float]:
    torch.manual_seed(0)
    E, D = 8, 16
    layer = impls.MoELayer(D, 32, num_experts=E, router="remoe", k=2)
    target = torch.nn.Linear(D, D)
    centres = torch.randn(4, D) * 2
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    history = []
    for _ in range(steps):
        x = centres[torch.randint(0, 4, (256,))] + 0.5 * torch.randn(256, D)
        out, plan = layer(x)
        loss = (out - target(x).detach()).pow(2).mean() + plan.aux_loss({"l1_adaptive": 1.0})
        opt.zero_grad()
        loss.backward()
        opt.step()
        if adapt:
            impls.step_routers(layer)
        history.append(float(plan.experts_per_token))
    return history


def test_remoe_regularization_drives_the_mean_active_experts_to_the_target():
    adapted = _train_remoe(adapt=True)
    frozen = _train_remoe(adapt=False)  # lambda stays 1e-8: the task alone keeps ~half the experts on
    late = sum(adapted[-150:]) / 150
    assert abs(late - 2.0) < 0.4, late
    assert sum(frozen[-150:]) / 150 > 3.0
    assert max(adapted[:5]) > 3.0  # it starts nearly dense (stage I)


def test_remoe_preset_and_capacity_refusal():
    p = impls.PRESETS["remoe_k1"]
    assert p.options == {"k": 1, "l1_init": 1e-8, "l1_step": 1.2} and p.num_experts == 8
    with pytest.raises(ValueError, match="capacity_factor"):
        ReMoERouter(4, 4, capacity_factor=1.0)


# ---------------------------------------------------------------------------------- DynMoE
def topany_reference(x, W, G, mask, training):
    """Top-any gating restated in plain PyTorch: ``(g [T, E] in {0,1}, weights [T, E])``."""
    cos = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(W, dim=-1).T
    s = torch.sigmoid(cos) * mask
    g = (s > torch.sigmoid(G)).float()
    if not training:
        none = g.sum(-1) == 0
        best = s.masked_fill(~mask, -1).argmax(-1)
        g[none] = torch.nn.functional.one_hot(best[none], W.shape[0]).float()
    return g, g / g.sum(-1, keepdim=True).clamp_min(1)


@pytest.mark.parametrize("training", [True, False])
def test_top_any_matches_a_restatement(training):
    torch.manual_seed(0)
    r = TopAnyRouter(8, 6, initial_experts=4).train(training)
    with torch.no_grad():
        r.thresholds.copy_(torch.tensor([-0.2, 0.1, 0.0, 0.3, 0.0, 0.0]))
    x = torch.randn(50, 8)
    plan = r(x)
    g, w = topany_reference(x, r.gate_vectors, r.thresholds, r.expert_mask, training)
    assert torch.equal(plan.keep_TK, g > 0)
    torch.testing.assert_close(plan.weights_TK, w)
    assert (plan.expert_ids_TK[:, 4:] == -1).all(), "an expert outside the pool was used"


def test_top_any_yields_zero_to_all_experts_as_thresholds_move():
    """Hand-checked: orthonormal gate vectors, x = e_0 + e_1 has cosine 1/sqrt(2) with experts 0 and 1."""
    r = TopAnyRouter(4, 4, initial_experts=4)
    with torch.no_grad():
        r.gate_vectors.copy_(torch.eye(4))
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    s = torch.sigmoid(torch.tensor([2**-0.5, 2**-0.5, 0.0, 0.0]))  # 0.67, 0.67, 0.5, 0.5
    counts = []
    for G in (-5.0, 0.3, 5.0):  # sigmoid(G): 0.007 (< every s), 0.574 (between), 0.993 (above all)
        with torch.no_grad():
            r.thresholds.fill_(G)
        plan = r(x)
        counts.append(int(plan.keep_TK.sum()))
        expected = (s > torch.sigmoid(torch.tensor(G))).float()
        torch.testing.assert_close(plan.weights_TK[0], expected / expected.sum().clamp_min(1))
    assert counts == [4, 2, 0]
    plan = r.eval()(x)  # evaluation: a token with no expert goes to its best one
    assert plan.keep_TK.sum() == 1 and plan.expert_ids_TK[0, 0] == 0 and plan.weights_TK[0, 0] == 1


def test_top_any_thresholds_get_a_straight_through_gradient():
    torch.manual_seed(1)
    r = TopAnyRouter(8, 4, initial_experts=4)
    plan = r(torch.randn(32, 8))
    (plan.weights_TK * torch.rand_like(plan.weights_TK)).sum().backward()
    assert r.thresholds.grad.abs().sum() > 0 and r.gate_vectors.grad.abs().sum() > 0


def test_top_any_losses_match_their_formulas():
    torch.manual_seed(2)
    r = TopAnyRouter(8, 4, initial_experts=3)
    x = torch.randn(20, 8)
    plan = r(x)
    W = torch.nn.functional.normalize(r.gate_vectors, dim=-1)
    m = r.expert_mask.float()
    diverse = ((W @ W.T - torch.eye(4)) * (m[:, None] * m[None])).norm()
    torch.testing.assert_close(plan.losses["diverse"], diverse)
    torch.testing.assert_close(plan.losses["simple"], r.gate_vectors.norm(dim=-1).mean())
    g = plan.keep_TK.float()
    routed = g.sum(-1) > 0
    me = (g / g.sum(-1, keepdim=True).clamp_min(1))[routed].mean(0)
    torch.testing.assert_close(plan.losses["load_balance"], 16 * (me * g[routed].mean(0)).mean())
    torch.testing.assert_close(plan.losses["efficiency"], g.mean())


def test_adapt_experts_removes_idle_experts_and_adds_one_for_unrouted_tokens():
    r = TopAnyRouter(4, 4, initial_experts=2)
    with torch.no_grad():
        r.gate_vectors.copy_(torch.eye(4))
        r.thresholds.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0]))  # sigmoid(0) = 0.5: needs cos > 0
    r.start_recording()
    x = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, -2.0, 3.0, 0.0], [0.0, -1.0, 1.0, 0.0]])
    plan = r(x)  # token 0 -> expert 0; tokens 1 and 2 have cos <= 0 with experts 0 and 1: unrouted
    assert plan.keep_TK.sum(-1).tolist() == [1, 0, 0]
    r.adapt_experts()
    # expert 1 got no token and is removed; the new expert takes the first free slot, which is 1 again
    assert r.active_experts == [0, 1]
    new = torch.tensor([0.0, -3.0, 4.0, 0.0]) / 5.0  # the normalized sum of the two unrouted tokens
    torch.testing.assert_close(r.gate_vectors[1], new)
    assert r.thresholds[1] == 0
    assert r(x[1:]).keep_TK[:, 1].all(), "the new expert now takes the tokens that had none"
    assert not bool(r.recording) and r.routed_tokens.sum() == 0


def test_top_any_schedule_follows_optimizer_steps():
    r = TopAnyRouter(4, 4, initial_experts=2, adapt_every=2)
    seen = []
    for _ in range(6):
        r.on_optimizer_step()
        seen.append(bool(r.recording))
    assert seen == [False, True, True, False, False, False]
