"""ERC loss: the coupling constraints on hand-checked activations, the noise bound keeping each proxy
nearest its own router row, and that minimizing it makes each expert respond most to its own proxy."""

from __future__ import annotations

import torch

import impls
from impls.routers.token_choice.erc import ERCRouter, erc_loss, proxy_tokens


def test_loss_on_hand_checked_activations():
    # n = 2, D = 2, F = 1: R = I, W_g^0 = [[2], [0]], W_g^1 = [[0], [1]] -> M = [[2, 0], [0, 1]]
    R = torch.eye(2)
    W = torch.tensor([[[2.0], [0.0]], [[0.0], [1.0]]])
    assert float(erc_loss(R, W, 1.0, noise=False)) == 0.0  # each expert answers its own proxy only
    # swap the experts: M = [[0, 2], [1, 0]]; i=0,j=1: max(2 - 0, 0) + max(1 - 0, 0) = 3;
    # i=1,j=0: max(1 - 0, 0) + max(2 - 0, 0) = 3 -> 6 / 4
    torch.testing.assert_close(erc_loss(R, W.flip(0), 1.0, noise=False), torch.tensor(1.5))
    # alpha scales the diagonal: M = [[2, 1.5], [1.5, 2]] with alpha 1 -> 0, with alpha 0.5 -> 4 * 0.5 / 4
    W2 = torch.stack([torch.tensor([[2.0], [1.5]]), torch.tensor([[1.5], [2.0]])])
    assert float(erc_loss(R, W2, 1.0, noise=False)) == 0.0
    torch.testing.assert_close(erc_loss(R, W2, 0.5, noise=False), torch.tensor(4 * 0.5 / 4))


def test_noise_keeps_each_proxy_nearest_its_own_row():
    torch.manual_seed(0)
    R = torch.randn(8, 16) * torch.rand(8, 1) * 3  # rows of different norms
    for _ in range(50):
        Rt = proxy_tokens(R, noise=True)
        assert not torch.equal(Rt, R)
        assert torch.equal(torch.cdist(Rt, R).argmin(-1), torch.arange(8))
    assert torch.equal(proxy_tokens(R, noise=False), R)
    assert torch.isfinite(erc_loss(R, torch.randn(8, 16, 4), 1.0, noise=True))


def test_minimizing_couples_experts_to_their_router_rows():
    torch.manual_seed(0)
    layer = impls.MoELayer(8, 16, router="erc", num_experts=6, k=2, activation="swiglu")
    opt = torch.optim.Adam(list(layer.parameters()), lr=1e-2)
    before = float(layer.router.coupling_loss(layer.experts).detach())
    for _ in range(200):
        loss = layer.router.coupling_loss(layer.experts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    assert float(layer.router.coupling_loss(layer.experts)) < 0.1 * before
    R = layer.router.gate.weight
    Wg = layer.experts.w_in_EDF[..., :16]
    M = torch.einsum("id,jdf->ijf", R, Wg).norm(dim=-1)
    assert torch.equal(M.argmax(0), torch.arange(6)) and torch.equal(M.argmax(1), torch.arange(6))


def test_validation():
    r = ERCRouter(8, 4)
    other = impls.MoELayer(8, 16, num_experts=5).experts
    try:
        r.coupling_loss(other)
    except ValueError as e:
        assert "5 experts" in str(e)
    else:
        raise AssertionError("expected a ValueError")
