"""Sparsity-constrained OT routing: k-sparse plans, the exact token marginal, POT as the reference."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

import impls
from impls.routers.assignment.sparse_ot import SparseOTRouter, sparse_ot_semi_dual, sparse_simplex_projection

ot = pytest.importorskip("ot")


def test_sparse_simplex_projection_by_hand():
    v = torch.tensor([[0.9, 0.5, 0.1, -1.0], [3.0, 0.0, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2]])
    y = sparse_simplex_projection(v, 2)
    # row 0: top-2 (0.9, 0.5), shift theta = (1.4 - 1) / 2 = 0.2 -> (0.7, 0.3)
    torch.testing.assert_close(y[0], torch.tensor([0.7, 0.3, 0.0, 0.0]))
    torch.testing.assert_close(y[1], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # one entry dominates
    torch.testing.assert_close(y[2], torch.tensor([0.5, 0.5, 0.0, 0.0]))  # ties: lowest indices
    assert ((y > 0).sum(-1) <= 2).all()
    torch.testing.assert_close(y.sum(-1), torch.ones(3))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_plans_have_at_most_k_nonzeros_per_token_and_the_exact_token_marginal(k):
    torch.manual_seed(k)
    T, E = 60, 6
    S = torch.softmax(2 * torch.randn(T, E, dtype=torch.float64), -1)
    plan, _ = sparse_ot_semi_dual(-S, torch.full((E,), T / E, dtype=torch.float64), k, steps=3000, lr=1e-2)
    assert ((plan > 0).sum(-1) <= k).all() and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(-1), torch.ones(T, dtype=torch.float64))  # exact side
    torch.testing.assert_close(plan.sum(0), torch.full((E,), T / E, dtype=torch.float64), atol=0.5, rtol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # POT passes an option SciPy deprecates
def test_the_semi_dual_solution_matches_pots_sparsity_constrained_solver():
    torch.manual_seed(0)
    T, E, k = 40, 5, 2
    S = torch.softmax(3 * torch.randn(T, E, dtype=torch.float64), -1)
    a = torch.full((E,), T / E, dtype=torch.float64)
    with contextlib.redirect_stdout(io.StringIO()):  # POT prints array shapes from this solver
        P, log = ot.smooth.smooth_ot_semi_dual(
            a.numpy(),
            np.ones(T),
            (-S).T.numpy().copy(),
            1.0,
            reg_type="sparsity_constrained",
            max_nz=k,
            log=True,
        )
    reference = torch.tensor(P).T  # POT: experts x tokens, the token columns exact and k-sparse
    plan, alpha = sparse_ot_semi_dual(-S, a, k, steps=20000, lr=1e-3)
    torch.testing.assert_close(plan, reference, atol=5e-3, rtol=0)
    # the semi-dual is invariant to a constant shift of alpha (both marginals have the same mass)
    ref_alpha = torch.tensor(log["alpha"])
    torch.testing.assert_close(alpha - alpha.mean(), ref_alpha - ref_alpha.mean(), atol=5e-3, rtol=0)


def test_router_dispatches_the_plans_support_with_softmax_weights():
    torch.manual_seed(0)
    r = SparseOTRouter(16, 4, k=2)
    x = torch.randn(32, 16)
    plan = r(x)
    probs = torch.softmax(x @ r.gate.weight.T, -1)
    support = plan.scores_TE > 0
    assert torch.equal(support.sum(-1), plan.keep_TK.sum(-1))
    ids = plan.expert_ids_TK
    assert support.gather(1, ids.clamp_min(0))[ids >= 0].all()
    torch.testing.assert_close(plan.weights_TK[ids >= 0], probs.gather(1, ids.clamp_min(0))[ids >= 0])
    torch.testing.assert_close(plan.scores_TE.sum(-1), torch.ones(32))


def test_transport_balances_a_skewed_batch_better_than_top2():
    torch.manual_seed(0)
    x = torch.randn(512, 16) + 2.0 * torch.randn(16)  # a shared offset makes the gate favour a few experts
    ot_router = SparseOTRouter(16, 8, k=2, steps=200)
    top2 = impls.build_router("topk", d_model=16, num_experts=8, k=2)
    top2.load_state_dict(ot_router.state_dict())
    ot_load, top_load = ot_router(x).expert_load, top2(x).expert_load
    assert ot_load.max() / ot_load.mean() < top_load.max() / top_load.mean()
