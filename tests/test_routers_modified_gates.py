"""X-MoE and StableMoE: the defining property of each paper on small hand-checkable cases."""

from __future__ import annotations

import math

import pytest
import torch

import impls
from impls.routers.token_choice.stablemoe import StableMoERouter
from impls.routers.token_choice.xmoe import XMoERouter


# ---------------------------------------------------------------------------------- X-MoE
def xmoe_reference(x, W, emb, tau, tau0, k):
    """X-MoE restated from Sec. 3 (Eq. 7-9) in plain PyTorch: (ids, weights, balance loss)."""
    z = x @ W.T
    s = (z / z.norm(dim=-1, keepdim=True)) @ (emb / emb.norm(dim=-1, keepdim=True)).T  # Eq. 7
    p = torch.softmax(s / tau, dim=-1)  # Eq. 8
    w, ids = p.topk(k, dim=-1)
    if k > 1:
        w = w / w.sum(-1, keepdim=True)
    N = emb.shape[0]
    t = torch.zeros(N).scatter_add_(0, ids.flatten(), torch.ones(ids.numel())) / ids.numel()
    bal = N * (t * torch.softmax(s / tau0, dim=-1).mean(0)).sum()  # Eq. 9
    return ids, w, bal


@pytest.mark.parametrize("k", [1, 2])
def test_xmoe_matches_a_restatement_of_the_paper(k):
    torch.manual_seed(0)
    r = XMoERouter(12, 6, k=k, routing_dim=3, temperature=0.2)
    x = torch.randn(40, 12)
    plan = r(x)
    ids, w, bal = xmoe_reference(x, r.projection.weight, r.expert_embeddings, 0.2, 0.3, k)
    assert torch.equal(plan.expert_ids_TK, ids)
    torch.testing.assert_close(plan.weights_TK, w)
    torch.testing.assert_close(plan.losses["load_balance"], bal)


def test_xmoe_scores_lie_in_the_unit_interval_over_tau_and_ignore_the_token_scale():
    torch.manual_seed(1)
    r = XMoERouter(16, 8, temperature=0.25).eval()
    x = torch.randn(64, 16)
    s = r.cosine_scores(x)
    assert s.abs().max() <= 1 + 1e-6
    logits = r(x).logits_TE
    assert logits.abs().max() <= 1 / 0.25 + 1e-5
    for scale in (1e-3, 3.0, 1e4):
        torch.testing.assert_close(r.cosine_scores(scale * x), s, atol=1e-6, rtol=0)
        assert torch.equal(r(scale * x).expert_ids_TK, r(x).expert_ids_TK)


def test_xmoe_cosine_of_aligned_token_is_one():
    """A token whose projection points along expert 2's embedding scores exactly 1 there."""
    r = XMoERouter(4, 3, routing_dim=2, temperature=0.5)
    with torch.no_grad():
        r.projection.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        r.expert_embeddings.copy_(torch.tensor([[1.0, 0], [0, 1.0], [0.6, 0.8]]) * 0.1)
    s = r.cosine_scores(torch.tensor([[3.0, 4.0, 7.0, -2.0]]))
    torch.testing.assert_close(s, torch.tensor([[0.6, 0.8, 1.0]]))
    plan = r(torch.tensor([[3.0, 4.0, 7.0, -2.0]]))
    assert plan.expert_ids_TK.item() == 2
    p = torch.softmax(torch.tensor([0.6, 0.8, 1.0]) / 0.5, 0)
    torch.testing.assert_close(plan.weights_TK, p[2:].view(1, 1))


def test_xmoe_temperature_is_learned_and_the_embedding_norm_stays_fixed():
    torch.manual_seed(2)
    r = XMoERouter(8, 4)
    opt = torch.optim.SGD(r.parameters(), lr=0.5)
    for _ in range(3):
        plan = r(torch.randn(32, 8))
        loss = (plan.weights_TK * torch.rand_like(plan.weights_TK)).sum() + plan.losses["load_balance"]
        opt.zero_grad()
        loss.backward()
        assert r.temperature.grad is not None and r.temperature.grad.abs() > 0
        opt.step()
        impls.step_routers(r)
        torch.testing.assert_close(r.expert_embeddings.norm(dim=-1), torch.full((4,), 0.1))
    assert r.temperature.item() != pytest.approx(0.3)


def test_xmoe_preset_matches_the_paper():
    r = impls.build_router("x_moe", d_model=32)
    assert r.num_experts == 32 and r.routing_dim == 16 and r.config.k == 1
    assert r.config.tau0 == 0.3 and XMoERouter(8, 4, gate="sigmoid").config.tau0 == 0.07


# ---------------------------------------------------------------------------------- StableMoE
def test_stablemoe_stage1_is_greedy_with_sigmoid_gate_and_the_papers_losses():
    torch.manual_seed(0)
    r = StableMoERouter(6, 3, vocab_size=10, distill_dim=4).train()
    x = torch.randn(12, 6)
    ids = torch.arange(12) % 10
    plan = r(x, token_ids=ids)
    s = x @ r.gate.weight.T  # Eq. 5
    a = s.argmax(-1)  # Eq. 6
    assert torch.equal(plan.expert_ids_TK[:, 0], a)
    torch.testing.assert_close(plan.weights_TK[:, 0], torch.sigmoid(s.gather(1, a[:, None])[:, 0]))
    # Eq. 8 by hand, divided by the token count
    n_bar = 12 / 3
    bal = sum(((a == i).sum() - n_bar) / n_bar * torch.sigmoid(s[a == i, i]).sum() for i in range(3)) / 12
    torch.testing.assert_close(plan.losses["balance"], bal)
    s_hat = r.routing_embedding(ids) @ r.distill_centroids.T  # Eq. 9
    dis = -torch.log_softmax(s_hat, -1).gather(1, a[:, None]).mean()  # Eq. 10
    torch.testing.assert_close(plan.losses["distill"], dis)


def test_stablemoe_distillation_learns_the_stage1_assignment():
    torch.manual_seed(0)
    V, E, D = 20, 4, 8
    r = StableMoERouter(D, E, vocab_size=V, distill_dim=6)
    table = torch.randn(V, D)  # each token id has one hidden state: the assignment is a function of it
    opt = torch.optim.Adam([r.routing_embedding.weight, r.distill_centroids], lr=0.05)
    ids = torch.arange(V).repeat(4)
    for _ in range(200):
        loss = r(table[ids], token_ids=ids).losses["distill"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    greedy = (table @ r.gate.weight.T).argmax(-1)
    r.eval()
    assert torch.equal(r(table, token_ids=torch.arange(V)).expert_ids_TK[:, 0], greedy)


def test_stablemoe_stage2_routing_is_a_fixed_function_of_the_token_id():
    torch.manual_seed(3)
    r = StableMoERouter(8, 4, vocab_size=16, distill_dim=5)
    ids = torch.arange(16).repeat(3)
    r.freeze_routing()
    assert r.stage == 2
    first = r(torch.randn(48, 8), token_ids=ids).expert_ids_TK
    expected = (r.routing_embedding(ids) @ r.distill_centroids.T).argmax(-1)
    assert torch.equal(first[:, 0], expected)
    # training goes on (the centroids E and the task move); the routing does not
    opt = torch.optim.AdamW(r.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(5):
        plan = r(torch.randn(48, 8) * 5, token_ids=ids)
        assert torch.equal(plan.expert_ids_TK, first)
        assert float(plan.losses["balance"].detach()) == 0 and float(plan.losses["distill"].detach()) == 0
        opt.zero_grad()
        (plan.weights_TK.sum()).backward()
        opt.step()
    assert r.gate.weight.grad is not None
    assert r.routing_embedding.weight.grad is None and r.distill_centroids.grad is None


def test_stablemoe_stage_survives_a_state_dict_round_trip():
    r = StableMoERouter(8, 4, vocab_size=16)
    r.freeze_routing()
    fresh = StableMoERouter(8, 4, vocab_size=16)
    fresh.load_state_dict(r.state_dict())
    assert fresh.stage == 2 and not fresh.distill_centroids.requires_grad


def test_stablemoe_needs_token_ids_and_a_vocabulary():
    with pytest.raises(ValueError, match="vocab_size"):
        StableMoERouter(8, 4)
    r = StableMoERouter(8, 4, vocab_size=16)
    with pytest.raises(TypeError, match="token_ids"):
        r(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"token_ids must be in \[0, 16\)"):
        r(torch.randn(3, 8), token_ids=torch.tensor([0, 1, 16]))
    assert math.isclose(impls.PRESETS["stable_moe"].loss_coefficients["balance"], 0.3)
