"""LASER: peaked tokens keep their top-k, flat tokens take the least-loaded of their top-c experts (hand
case), it only applies at inference by default, and it lowers the load imbalance of a skewed batch."""

from __future__ import annotations

import torch

from impls.routers.token_choice.laser import LASERRouter, laser_select
from impls.routers.token_choice.topk import TopKRouter


def test_hand_case_flat_tokens_move_to_the_least_loaded_candidates():
    # k = 1, c = 2; plain top-1: tokens 0, 1, 2 -> expert 0 (load 3), token 3 -> expert 2 (load 1)
    p = torch.tensor(
        [
            [0.90, 0.05, 0.05],  # peaked: stays on 0
            [0.36, 0.34, 0.30],  # flat: candidates {0, 1}, loads 3 and 0 -> expert 1
            [0.35, 0.30, 0.35],  # flat: tie 0 / 2 on probability (lower index first) -> {0, 2}: 2 (load 1)
            [0.10, 0.20, 0.70],  # peaked: stays on 2
        ]
    )
    ids, flat = laser_select(p, 1, 2, flat_threshold=0.4)
    assert flat.tolist() == [False, True, True, False]
    assert ids[:, 0].tolist() == [0, 1, 2, 2]


def test_inference_only_by_default_and_peaked_tokens_unchanged():
    torch.manual_seed(0)
    laser = LASERRouter(8, 6, k=2, flat_threshold=0.5)
    plain = TopKRouter(8, 6, k=2)
    plain.load_state_dict({"gate.weight": laser.gate.weight.detach()})
    x = torch.randn(200, 8)
    assert torch.equal(laser.train()(x).expert_ids_TK, plain.train()(x).expert_ids_TK)
    a, b = laser.eval()(x), plain.eval()(x)
    peaked = b.weights_TK.new_tensor(torch.softmax(x @ plain.gate.weight.T, -1).topk(2).values.sum(-1) >= 0.5)
    assert torch.equal(a.expert_ids_TK[peaked.bool()], b.expert_ids_TK[peaked.bool()])
    torch.testing.assert_close(a.weights_TK.sum(-1), torch.ones(200))


def test_lowers_the_imbalance_of_a_skewed_batch():
    torch.manual_seed(0)
    laser = LASERRouter(8, 8, k=2, flat_threshold=0.6, candidates=6).eval()
    with torch.no_grad():
        laser.gate.weight.mul_(0.3)
        laser.gate.weight[0] += 0.2  # expert 0 slightly preferred by every token
    x = torch.randn(4000, 8) + 1.0
    plain = TopKRouter(8, 8, k=2).eval()
    plain.load_state_dict({"gate.weight": laser.gate.weight.detach()})
    a, b = laser(x), plain(x)
    assert float(a.info["flat_fraction"]) > 0.5

    def max_over_mean(plan):
        load = plan.expert_load
        return float(load.max() / load.mean())

    assert max_over_mean(a) < 0.8 * max_over_mean(b)
