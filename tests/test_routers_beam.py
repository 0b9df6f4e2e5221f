"""BEAM: the zero-initialized mask starts at plain top-K, candidates switch off in evaluation as the mask
moves (0..K experts per token), the straight-through gradient reaches the mask router, and the
mask regularizer lowers the number of active experts."""

from __future__ import annotations

import torch

from impls.routers.token_choice.beam import BEAMRouter
from impls.routers.token_choice.topk import TopKRouter


def test_zero_mask_router_starts_at_plain_top_k():
    torch.manual_seed(0)
    beam = BEAMRouter(8, 6, k=2)
    plain = TopKRouter(8, 6, k=2)
    plain.load_state_dict({"gate.weight": beam.gate.weight.detach()})
    x = torch.randn(20, 8)
    for mode in (True, False):
        a, b = beam.train(mode)(x), plain.train(mode)(x)
        assert torch.equal(a.expert_ids_TK, b.expert_ids_TK) and torch.equal(a.keep_TK, b.keep_TK)
        torch.testing.assert_close(a.weights_TK, b.weights_TK)
    assert float(a.info["active_fraction"]) == 1.0


def test_masks_switch_candidates_off_in_eval_only():
    torch.manual_seed(0)
    r = BEAMRouter(4, 3, k=2)
    with torch.no_grad():
        r.mask_gate.weight.copy_(torch.tensor([[10.0, 0, 0, 0], [-10.0, 0, 0, 0], [0.0, 10, 0, 0]]))
    x = torch.tensor([[1.0, 1.0, 0, 0], [-1.0, -1.0, 0, 0], [1.0, -1.0, 0, 0]])
    ev = r.eval()(x)
    m = torch.sigmoid(x @ r.mask_gate.weight.T) >= 0.5
    expected_keep = m.gather(1, ev.expert_ids_TK)
    assert torch.equal(ev.keep_TK, expected_keep)
    counts = ev.keep_TK.sum(-1)
    assert counts.min() < 2  # some tokens use fewer than K experts
    torch.testing.assert_close(ev.weights_TK[~expected_keep], torch.zeros(int((~expected_keep).sum())))
    tr = r.train()(x)
    assert tr.keep_TK.all()  # every candidate is still computed in training (the mask needs its output)
    assert torch.equal(tr.weights_TK == 0, ~expected_keep)


def test_straight_through_gradient_and_regularizer_reduce_active_experts():
    torch.manual_seed(0)
    r = BEAMRouter(8, 4, k=2)
    opt = torch.optim.SGD(r.mask_gate.parameters(), lr=1.0)
    x = torch.randn(256, 8)
    plan = r(x)
    (plan.weights_TK.sum() + plan.losses["mask_sparsity"]).backward()
    assert r.mask_gate.weight.grad.abs().sum() > 0
    for _ in range(100):
        loss = r(x).losses["mask_sparsity"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(r.eval()(x).info["active_fraction"]) < 0.5
