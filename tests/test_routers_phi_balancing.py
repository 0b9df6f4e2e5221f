"""ϕ-Balancing: the EMA of the routing distribution and the price loss on hand-checked values, the
stop-gradient prices, and balance on a skewed stream."""

from __future__ import annotations

import math

import pytest
import torch

from impls.routers.token_choice.phi_balancing import PhiBalancingRouter, phi_prices


def test_ema_and_price_loss_on_hand_checked_values():
    r = PhiBalancingRouter(2, 2, k=1, normalize=False, eta=0.5)
    with torch.no_grad():
        r.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    x = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # softmax rows [3/4, 1/4] and [1/2, 1/2]
    plan = r(x)
    p = torch.tensor([0.625, 0.375])
    m = 0.5 * torch.tensor([0.5, 0.5]) + 0.5 * p
    torch.testing.assert_close(r.ema_probs, m)
    q = torch.log(m) + 1
    torch.testing.assert_close(plan.losses["phi_balance"], (q * p).sum())
    assert "load_balance" not in plan.losses  # the price loss replaces the Switch loss
    r.eval()
    r(x)
    torch.testing.assert_close(r.ema_probs, m)  # evaluation leaves the EMA alone


def test_prices_are_stop_gradient():
    torch.manual_seed(0)
    r = PhiBalancingRouter(4, 3, k=1, normalize=False)
    x = torch.randn(5, 4)
    logits = (x @ r.gate.weight.T).detach().requires_grad_()
    plan = r.route(logits, x, None)
    plan.losses["phi_balance"].backward()
    q = phi_prices(r.ema_probs, "neg_entropy")
    ref_logits = logits.detach().clone().requires_grad_()
    (q * torch.softmax(ref_logits, -1).mean(0)).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)
    assert torch.equal(phi_prices(torch.tensor([0.2, 0.8]), "l2"), torch.tensor([0.2, 0.8]))


@pytest.mark.parametrize("potential", ["neg_entropy", "l2"])
def test_price_loss_balances_a_skewed_router(potential):
    torch.manual_seed(0)
    r = PhiBalancingRouter(8, 4, k=1, normalize=False, router_bias=True, potential=potential)
    with torch.no_grad():
        r.gate.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))  # expert 0 takes nearly everything
    opt = torch.optim.SGD(r.parameters(), lr=0.5 if potential == "neg_entropy" else 5.0)

    def max_over_mean():
        with torch.no_grad():
            ids = r.eval()(torch.randn(4000, 8)).expert_ids_TK[:, 0]
        r.train()
        c = torch.bincount(ids, minlength=4).float()
        return float(c.max() / c.mean())

    before = max_over_mean()
    for _ in range(200):
        loss = r(torch.randn(256, 8)).losses["phi_balance"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = max_over_mean()
    assert before > 3.0 and after < 1.5
    assert float(r.ema_probs.max()) < 0.4


def test_validation_and_empty_batch():
    with pytest.raises(ValueError, match="eta"):
        PhiBalancingRouter(4, 3, eta=0.0)
    with pytest.raises(ValueError, match="potential"):
        PhiBalancingRouter(4, 3, potential="tsallis")
    r = PhiBalancingRouter(4, 3)
    m = r.ema_probs.clone()
    plan = r(torch.randn(0, 4))
    assert float(plan.losses["phi_balance"]) == 0.0 and torch.equal(r.ema_probs, m)
