"""SimBal: the orthogonality loss on hand-checked matrices, the orthogonal start, and that minimizing it
makes the routing preserve the tokens' similarities."""

from __future__ import annotations

import torch

import impls
from impls.routers.token_choice.simbal import SIMBAL_OLMOE, SimBalRouter, orthogonality_loss


def test_orthogonality_loss_on_hand_checked_matrices():
    assert float(orthogonality_loss(torch.eye(3, 5))) == 0.0
    # rows (1, 1) and (1, 0): Gram [[2, 1], [1, 1]] - I = [[1, 1], [1, 0]] -> L1 = 3
    assert float(orthogonality_loss(torch.tensor([[1.0, 1.0], [1.0, 0.0]]))) == 3.0
    # a scaled orthonormal router pays on the diagonal only: 2 * |0.25 - 1|
    torch.testing.assert_close(orthogonality_loss(0.5 * torch.eye(2)), torch.tensor(1.5))


def test_router_starts_orthogonal_and_reports_the_loss():
    torch.manual_seed(0)
    r = SimBalRouter(16, 8, k=2)
    assert float(r(torch.randn(5, 16)).losses["orthogonality"]) < 1e-4
    r2 = SimBalRouter(16, 8, k=2, orthogonal_init=False)
    assert float(r2(torch.randn(5, 16)).losses["orthogonality"]) > 1.0


def test_minimizing_the_loss_makes_routing_preserve_similarity():
    torch.manual_seed(0)
    r = SimBalRouter(8, 8, k=2, orthogonal_init=False)
    with torch.no_grad():
        r.gate.weight.copy_(torch.randn(8, 8) * 0.5 + torch.randn(1, 8))  # correlated expert directions
    opt = torch.optim.Adam(r.parameters(), lr=1e-2)
    for _ in range(800):
        loss = r(torch.randn(4, 8)).losses["orthogonality"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    W = r.gate.weight.detach()
    torch.testing.assert_close(W @ W.T, torch.eye(8), atol=0.02, rtol=0)
    x = torch.randn(50, 8)
    logits = x @ W.T
    # an orthogonal router is an isometry: the logits keep every pairwise distance
    torch.testing.assert_close(torch.cdist(logits, logits), torch.cdist(x, x), atol=0.1, rtol=0.02)


def test_preset():
    assert SIMBAL_OLMOE.num_experts == 32 and SIMBAL_OLMOE.options == {"k": 4}
    assert SIMBAL_OLMOE.loss_coefficients == {"orthogonality": 0.1, "z_loss": 1e-5}
    r = impls.build_router("simbal_olmoe", d_model=64)
    assert float(r(torch.randn(3, 64)).losses["orthogonality"]) < 1e-3
