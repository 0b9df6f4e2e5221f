"""LSH routing (Baykal et al., NeurIPS 2022): buckets are sign patterns of fixed random hyperplanes."""

from __future__ import annotations

import math

import pytest
import torch

import impls
from impls.routers.non_trainable.lsh import LSHRouter


def test_bucket_is_the_sign_pattern_read_in_binary():
    r = LSHRouter(3, 8)  # one table, m = 3 hyperplanes
    with torch.no_grad():
        r.hyperplanes.copy_(torch.eye(3)[None])
    x = torch.tensor([[1.0, -2.0, 3.0], [-1.0, -1.0, -1.0], [0.5, 0.5, -0.1]])
    plan = r(x)
    assert plan.expert_ids_TK[:, 0].tolist() == [0b101, 0b000, 0b110]
    assert (plan.weights_TK == 1).all()


def test_tables_own_disjoint_expert_ranges_and_share_the_weight():
    r = LSHRouter(8, 16, num_tables=2)  # 2 tables x 8 buckets
    plan = r(torch.randn(50, 8))
    assert ((plan.expert_ids_TK[:, 0] >= 0) & (plan.expert_ids_TK[:, 0] < 8)).all()
    assert ((plan.expert_ids_TK[:, 1] >= 8) & (plan.expert_ids_TK[:, 1] < 16)).all()
    torch.testing.assert_close(plan.weights_TK, torch.full((50, 2), 0.5))


def test_routing_ignores_a_positive_scale_and_nothing_is_trained():
    r = LSHRouter(16, 8, seed=3)
    x = torch.randn(40, 16)
    assert torch.equal(r(x).expert_ids_TK, r(7.5 * x).expert_ids_TK)
    assert not list(r.parameters())


def test_collision_probability_follows_the_angle():
    """Two tokens at angle theta share a table's bucket with probability (1 - theta / pi) ** m."""
    d, m, trials = 8, 2, 3000
    theta = math.pi / 3
    a = torch.zeros(d)
    a[0] = 1.0
    b = torch.zeros(d)
    b[0], b[1] = math.cos(theta), math.sin(theta)
    same = 0
    for seed in range(trials):
        r = LSHRouter(d, 2**m, seed=seed)
        ids = r(torch.stack([a, b])).expert_ids_TK[:, 0]
        same += int(ids[0] == ids[1])
    expected = (1 - theta / math.pi) ** m  # 4/9
    assert abs(same / trials - expected) < 0.03


def test_expert_count_must_be_tables_times_a_power_of_two():
    with pytest.raises(ValueError, match="num_tables"):
        LSHRouter(8, 12)
    with pytest.raises(ValueError, match="num_tables"):
        impls.build_router("lsh", d_model=8, num_experts=8, num_tables=3)
