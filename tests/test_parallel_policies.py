"""Dispatch policies, the expert-parallel simulator and emulated NVFP4, on one process.

Each policy's defining property is checked on hand-worked tiny cases and on random count matrices.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import impls
from impls.parallel import (
    FineMoE,
    LeastLoadedEP,
    ReaLB,
    ReLibra,
    StandardEP,
    build_policy,
    counts_from_expert_ids,
    counts_from_plan,
    fine_moe_placement,
    simulate,
)
from impls.parallel.fp4 import E2M1_GRID, fake_nvfp4


def random_counts(seed: int, W: int, E: int, skew: float = 1.5, high: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    weights = rng.pareto(skew, E) + 0.05
    return rng.poisson(high * weights / weights.mean(), size=(W, E)).astype(np.int64)


# ---------------------------------------------------------------------------------- standard


def test_standard_ep_computes_every_row_on_its_native_rank():
    counts = np.array([[3, 1, 0, 2], [1, 0, 5, 0]])
    a = StandardEP().assign(counts)
    assert a.load_R.tolist() == [3 + 1 + 1, 2 + 5]
    assert a.transfers == []
    assert a.rows_RER[1, 2].tolist() == [0, 5]


def test_policies_refuse_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        StandardEP().assign(np.ones((3, 4), dtype=int))
    with pytest.raises(ValueError, match="non-negative integer"):
        StandardEP().assign(np.full((2, 4), -1))
    with pytest.raises(ValueError, match="unknown dispatch policy"):
        build_policy("fastest")
    with pytest.raises(ValueError, match="lam"):
        LeastLoadedEP(lam=0.5)
    with pytest.raises(ValueError, match="vision_counts_RE"):
        ReaLB().assign(np.ones((2, 4), dtype=int), vision_counts_RE=np.full((2, 4), 2))


# ---------------------------------------------------------------------------------- LLEP


def test_llep_hand_worked_case():
    # experts 0, 1 on rank 0; 2, 3 on rank 1. Loads l = [12, 4, 0, 0], capacity alpha * 16 / 2 = 8.
    # e0 (native 0): pending 16 - 12 = 4, headroom 8 - 0 - 4 = 4 -> keeps 4, spills 8 to rank 1.
    # e1: pending 0, headroom 8 - 4 - 0 = 4 >= 4 -> rank 0 keeps it all.
    counts = np.array([[6, 2, 0, 0], [6, 2, 0, 0]])
    a = LeastLoadedEP().assign(counts)
    assert a.info["gated"] is False and a.info["capacity"] == 8
    assert a.load_R.tolist() == [8, 8]
    # the native rank keeps the first rows of e0 in source order: source 0's first 4
    assert a.rows_RER[0, 0].tolist() == [4, 2] and a.rows_RER[1, 0].tolist() == [0, 6]
    assert a.rows_RER[:, 1, 0].tolist() == [2, 2]
    assert a.transfers == [(0, 1)]


def test_llep_gate_keeps_standard_ep_below_lambda():
    counts = np.array([[5, 5, 4, 6], [5, 6, 5, 4]])
    a = LeastLoadedEP(lam=1.3).assign(counts)
    assert a.info["gated"] is True
    assert np.array_equal(a.rows_RER, StandardEP().assign(counts).rows_RER)


def test_llep_min_chunk_skips_small_spills_and_forces_the_remainder():
    # W=3, one expert per rank. l = [30, 0, 0]; capacity 10. Native keeps 10; 20 to spill.
    # With min_chunk=15 a chunk of 10 that does not finish the expert is skipped on every rank:
    # no rank qualifies, so the least-loaded other rank (rank 1, lower id on a tie) takes all 20.
    counts = np.array([[30, 0, 0]])
    counts = np.vstack([counts, np.zeros((2, 3), dtype=int)])
    a = LeastLoadedEP(min_chunk=15).assign(counts)
    assert a.load_R.tolist() == [10, 20, 0]
    assert a.info["forced_spills"] == 1
    b = LeastLoadedEP(min_chunk=1).assign(counts)
    assert b.load_R.tolist() == [10, 10, 10]


@pytest.mark.parametrize("seed", range(12))
def test_llep_conserves_rows_and_respects_its_capacity(seed):
    W, E = 4, 16
    counts = random_counts(seed, W, E)
    counts[0, 0] += 200  # one hot expert
    counts[0, 1] += (-counts.sum()) % W  # an integral capacity: then no spill is ever forced
    a = LeastLoadedEP(lam=1.0, alpha=1.0, min_chunk=1).assign(counts)
    a.check(counts)
    assert a.info["forced_spills"] == 0
    assert a.load_R.max() <= counts.sum() // W
    assert a.load_R.max() < StandardEP().assign(counts).load_R.max()
    # a rank computes only its own experts and the ones it receives
    for e in range(E):
        for q in np.nonzero(a.expert_rank_EW[e])[0]:
            assert q == a.owner_E[e] or (e, q) in a.transfers


# ---------------------------------------------------------------------------------- FineMoE


def _max_density(load: np.ndarray, place: np.ndarray, W: int) -> float:
    """max over rank subsets S of (load of the experts whose every copy is in S) / |S|."""
    best = 0.0
    sets = [set(p.tolist()) for p in place]
    for size in range(1, W + 1):
        for S in itertools.combinations(range(W), size):
            s = set(S)
            inside = sum(int(load[e]) for e in range(len(load)) if sets[e] <= s)
            best = max(best, inside / size)
    return best


def test_fine_moe_placement_is_circulant_and_crossing():
    place = fine_moe_placement(8, 4, 2)
    assert place[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert place[:, 1].tolist() == [1, 2, 2, 3, 3, 0, 0, 1]
    assert all(len(set(p)) == 2 for p in place.tolist())
    # every rank holds as many copies as every other
    assert np.bincount(place.reshape(-1), minlength=4).tolist() == [4, 4, 4, 4]


@pytest.mark.parametrize("seed", range(8))
def test_fine_moe_reaches_the_max_density_bound(seed):
    W, E = 4, 8
    counts = random_counts(seed, W, E, high=20)
    pol = FineMoE(replicas=2)
    a = pol.assign(counts)
    a.check(counts)
    load = counts.sum(0)
    m_star = _max_density(load, fine_moe_placement(E, W, 2), W)
    assert a.load_R.max() == math.ceil(m_star - 1e-9) == a.info["optimal_max_load"]
    assert a.load_R.max() <= StandardEP().assign(counts).load_R.max()
    place = fine_moe_placement(E, W, 2)
    for e in range(E):  # rows only on ranks holding a copy
        assert set(np.nonzero(a.expert_rank_EW[e])[0].tolist()) <= set(place[e].tolist())


def test_fine_moe_routes_locality_first():
    W, E = 4, 8
    counts = random_counts(3, W, E, high=20)
    a = FineMoE().assign(counts)
    place = fine_moe_placement(E, W, 2)
    quota = a.expert_rank_EW
    for s in range(W):
        for e in range(E):
            if s in place[e]:
                kept = a.rows_RER[s, e, s]
                # a source sends rows of e elsewhere only once its own copy's quota is used up by them
                assert kept == min(counts[s, e], quota[e, s])


# ---------------------------------------------------------------------------------- ReLibra


def test_relibra_placement_balances_nodes_with_equal_expert_counts():
    load = np.array([100, 90, 10, 5, 80, 3, 2, 1])
    pol = ReLibra(ranks_per_node=2)
    place = pol.plan_placement(load, world_size=4)
    assert np.bincount(place, minlength=4).tolist() == [2, 2, 2, 2]
    node = place // 2
    node_load = np.bincount(node, weights=load, minlength=2)
    native_node_load = np.bincount(np.arange(8) // 4, weights=load, minlength=2)
    assert node_load.max() < native_node_load.max()
    # longest first: 100 -> node 0, 90 -> node 1, 80 -> node 1 (less loaded), 10 -> node 0, ...
    assert node[0] != node[1] and node[1] == node[4]


@pytest.mark.parametrize("seed", range(6))
def test_relibra_replication_stays_inside_nodes_and_never_raises_the_peak(seed):
    W, E, P = 4, 8, 2
    counts = random_counts(seed, W, E)
    pol = ReLibra(ranks_per_node=P, tol=0.0, max_moves=8)
    pol.plan_placement(counts.sum(0), W)
    placed_only = ReLibra(ranks_per_node=P, max_moves=0)
    placed_only.placement_E = pol.placement_E
    a, b = pol.assign(counts), placed_only.assign(counts)
    a.check(counts)
    node_of = np.arange(W) // P
    node_a = np.bincount(node_of, weights=a.load_R, minlength=2)
    np.testing.assert_array_equal(node_a, np.bincount(node_of, weights=b.load_R, minlength=2))
    assert a.load_R.max() <= b.load_R.max()
    for e, q in a.transfers:  # copies only inside the planned rank's node
        assert node_of[q] == node_of[pol.placement_E[e]] or q == pol.placement_E[e]


def test_relibra_refuses_a_placement_for_another_layer():
    pol = ReLibra()
    pol.plan_placement(np.arange(8), world_size=2)
    with pytest.raises(ValueError, match="placement"):
        pol.assign(np.ones((4, 8), dtype=int))


# ---------------------------------------------------------------------------------- ReaLB


def test_realb_moves_nothing_and_switches_only_hot_vision_ranks():
    counts = np.array([[400, 400, 50, 50], [400, 400, 50, 50]])  # rank 0 hot
    vision_hot = counts.copy()
    vision_hot[:, 2:] = 0
    a = ReaLB(batch_threshold=100).assign(counts, vision_counts_RE=vision_hot)
    np.testing.assert_array_equal(a.rows_RER, StandardEP().assign(counts).rows_RER)
    assert a.low_precision_R.tolist() == [True, False]
    text_hot = np.zeros_like(counts)  # the hot rank serves text: it stays exact
    assert ReaLB(batch_threshold=100).assign(counts, vision_counts_RE=text_hot).low_precision_R.tolist() == [
        False,
        False,
    ]
    assert not ReaLB(batch_threshold=10_000).assign(counts).low_precision_R.any()  # small batch: no switch
    pol = ReaLB(batch_threshold=100, fp4_speedup=2.0)
    t = pol.compute_time_R(pol.assign(counts))
    assert t.max() < StandardEP().assign(counts).load_R.max()


# ---------------------------------------------------------------------------------- simulator


def test_simulator_counts_bytes_by_hand():
    counts = np.array([[6, 2, 0, 0], [6, 2, 0, 0]])
    D, expert_numel = 8, 100
    std = simulate(counts, "standard", d_model=D, expert_numel=expert_numel)
    # standard: source 1's 8 rows cross to rank 0 and come back
    assert std.token_bytes == 2 * 8 * D * 4 and std.weight_bytes == 0
    assert std.load_R.tolist() == [16, 0] and std.imbalance == 2.0
    ll = simulate(counts, "llep", d_model=D, expert_numel=expert_numel)
    # LLEP: source 0 sends 2 rows of e0 to rank 1, source 1 sends 2 rows of e1 to rank 0
    assert ll.token_bytes == 2 * 4 * D * 4
    assert ll.weight_bytes == 1 * expert_numel * 4 and ll.transfers == 1
    assert ll.step_bytes == 2 * (ll.token_bytes + ll.weight_bytes)
    assert ll.as_dict()["max_load"] == 8
    assert std.makespan == std.imbalance == 2.0
    # ReaLB: the hot rank at half time; the step waits for the slowest rank
    counts = np.array([[600, 600, 50, 50], [600, 600, 50, 50]])
    rb = simulate(counts, "realb", batch_threshold=0, fp4_speedup=2.0)
    assert rb.assignment.low_precision_R.tolist() == [True, False]
    assert rb.makespan == max(2400 / 2, 200) / 1300 < simulate(counts).makespan


def test_counts_from_plan_and_traces():
    torch.manual_seed(0)
    router = impls.build_router("topk", d_model=8, num_experts=4, k=2)
    plan = router(torch.randn(12, 8))
    counts = counts_from_plan(plan, 3)
    assert counts.shape == (3, 4) and counts.sum() == 24
    ids = plan.expert_ids_TK
    np.testing.assert_array_equal(counts[1], np.bincount(ids[4:8].reshape(-1).numpy(), minlength=4))
    with pytest.raises(ValueError, match="equal shards"):
        counts_from_expert_ids(ids, 4, 5)
    with pytest.raises(ValueError, match="out of range"):
        counts_from_expert_ids(ids, 2, 3)


# ---------------------------------------------------------------------------------- NVFP4


def test_fake_nvfp4_keeps_grid_values_and_rounds_to_nearest():
    grid = torch.tensor(E2M1_GRID)
    x = torch.cat([grid, -grid]).repeat(2)[:16]  # one block, amax 6 -> block scale 1
    torch.testing.assert_close(fake_nvfp4(x), x, rtol=0, atol=0)
    y = torch.tensor([6.0, 2.4, 2.6, 5.1, 0.2, 0.3, 1.2, -4.4] + [0.0] * 8)
    want = torch.tensor([6.0, 2.0, 3.0, 6.0, 0.0, 0.5, 1.0, -4.0] + [0.0] * 8)
    torch.testing.assert_close(fake_nvfp4(y), want, rtol=0, atol=0)


def test_fake_nvfp4_scales_each_block_and_passes_the_gradient_through():
    x = torch.cat([torch.linspace(-1, 1, 16), 100 * torch.linspace(-1, 1, 16)]).requires_grad_()
    q = fake_nvfp4(x)
    # each block keeps its own range: the small block is not flushed to zero by the large one
    assert q[:16].abs().max() > 0.5 and q[16:].abs().max() > 50
    rel = ((q - x).abs() / x.abs().clamp_min(1e-3))[x.abs() > 0.2]
    assert rel.max() < 0.34  # E2M1 spacing: at most a third of the value
    q.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
