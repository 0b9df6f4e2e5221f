"""Flextron: nested widths, static vs dynamic routing, the straight-through choice, the latency loss on
hand-checked values, and the staged surrogate workflow (surrogate fit, then routers to the budget)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from impls.routers.token_choice.flextron import (
    ElasticMLP,
    FlextronRouter,
    FlextronSurrogate,
    latency_loss,
    width_units,
)


def test_width_units_are_nested_prefixes():
    assert width_units((0.25, 0.5, 0.75, 1.0), 10) == [3, 5, 8, 10]
    assert width_units((0.5, 1.0), 128) == [64, 128]


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_each_width_is_the_mlp_of_the_first_units(activation):
    torch.manual_seed(0)
    mlp = ElasticMLP(6, 8, width_choices=(0.25, 0.5, 1.0), activation=activation)
    x = torch.randn(5, 6)
    for c, n in enumerate([2, 4, 8]):
        up = mlp.up.weight
        if activation == "swiglu":
            a = x @ up[:n].T + mlp.up.bias[:n]
            b = x @ up[8 : 8 + n].T + mlp.up.bias[8 : 8 + n]
            h = nn.functional.silu(a) * b
        else:
            pre = x @ up[:n].T + mlp.up.bias[:n]
            h = nn.functional.gelu(pre) if activation == "gelu" else nn.functional.relu(pre)
        ref = h @ mlp.down.weight[:, :n].T + mlp.down.bias
        torch.testing.assert_close(mlp(x, width=c), ref)


def test_ranking_keeps_the_full_width_function_and_puts_important_units_first():
    torch.manual_seed(1)
    mlp = ElasticMLP(6, 16, width_choices=(0.25, 1.0), activation="relu")
    x = torch.randn(64, 6)
    before = mlp(x, width=1)
    mlp.rank_units_(x)
    torch.testing.assert_close(mlp(x, width=1), before, rtol=1e-5, atol=1e-6)
    importance = mlp.hidden(x).abs().mean(0)
    assert torch.all(importance[:-1] >= importance[1:])


def test_static_routing_depends_on_the_budget_only_and_dynamic_on_the_token():
    torch.manual_seed(0)
    x = torch.randn(20, 8)
    budgets = torch.tensor([0] * 10 + [1] * 10)
    static = FlextronRouter(8, 3, mode="static", budgets=(0.5, 1.0)).eval()
    plan = static(x, budget_ids=budgets)
    again = static(torch.randn(20, 8) * 5, budget_ids=budgets)
    assert torch.equal(plan.expert_ids_TK, again.expert_ids_TK)
    assert plan.expert_ids_TK[:10].unique().numel() == 1 and plan.expert_ids_TK[10:].unique().numel() == 1
    dynamic = FlextronRouter(8, 3, mode="dynamic", budgets=(0.5, 1.0), router_hidden=16).eval()
    logits = dynamic(x, budget_ids=budgets).logits_TE
    assert not torch.allclose(logits[0], logits[1])  # same budget, different tokens


def test_training_choice_is_straight_through_gumbel():
    torch.manual_seed(0)
    r = FlextronRouter(4, 3, mode="dynamic", budgets=(1.0,), tau=0.5)
    x = torch.randn(4000, 4)
    plan = r(x, budget_ids=torch.zeros(4000, dtype=torch.long))
    assert torch.all(plan.weights_TK == 1.0)
    # Gumbel-max: the choice frequencies follow the router's softmax (averaged over tokens)
    freq = torch.bincount(plan.expert_ids_TK[:, 0], minlength=3).float() / 4000
    torch.testing.assert_close(freq, plan.scores_TE.mean(0).detach(), atol=0.03, rtol=0)
    plan.weights_TK.sum().backward()  # the gradient of the soft sample reaches the router
    assert r.mlp[2].weight.grad.abs().sum() > 0
    r.eval()
    e1 = r(x[:50], budget_ids=torch.zeros(50, dtype=torch.long))
    assert torch.equal(e1.expert_ids_TK[:, 0], e1.logits_TE.argmax(-1))


def test_latency_loss_on_hand_checked_values():
    # two layers, widths (0.5, 1.0): latencies [[1, 3], [2, 2]]; full latency 3 + 2 = 5
    r = FlextronRouter(4, 2, mode="static", budgets=(0.5,)).eval()
    plan = r(torch.zeros(3, 4), budget_ids=torch.zeros(3, dtype=torch.long))
    p = torch.softmax(plan.logits_TE[0], -1)
    expected = (p @ torch.tensor([1.0, 3.0]) + p @ torch.tensor([2.0, 2.0])) / 5
    loss = latency_loss([plan, plan], torch.tensor([[1.0, 3.0], [2.0, 2.0]]), 0.5)
    torch.testing.assert_close(loss, (expected - 0.5) ** 2)
    with pytest.raises(ValueError, match="table_LC"):
        latency_loss([plan], torch.ones(2, 2), 0.5)


def test_staged_workflow_surrogate_then_routers_meet_the_budget():
    """Fit the surrogate to a loss that falls with width, then train the routers against it plus the
    latency loss: the expected latency settles near the budget (not at the full width)."""
    torch.manual_seed(0)
    L, widths = 2, (0.25, 0.5, 1.0)
    table = torch.tensor([[0.3, 0.5, 1.0]] * L)
    surrogate = FlextronSurrogate(L, 3, hidden=32)
    opt_s = torch.optim.Adam(surrogate.parameters(), lr=1e-2)

    def true_loss(logits):  # the "LM loss": lower with wider layers
        return sum(4.0 - torch.softmax(z, -1).mean(0) @ torch.tensor([0.0, 1.0, 1.5]) for z in logits)

    errors = []
    for _ in range(600):  # stage 1: fit the surrogate on random router logits
        logits = [torch.randn(1, 3) * 2 for _ in range(L)]
        errors.append(float(surrogate.fit_step(logits, true_loss(logits), opt_s)))
    assert FlextronSurrogate.ready(errors[-50:], threshold=0.01)
    for p in surrogate.parameters():
        p.requires_grad_(False)
    x, b = torch.randn(16, 8), torch.zeros(16, dtype=torch.long)

    def train_routers(latency_weight):
        torch.manual_seed(1)
        routers = [
            FlextronRouter(8, 3, width_choices=widths, budgets=(0.5,), mode="static") for _ in range(L)
        ]
        opt_r = torch.optim.Adam([p for r in routers for p in r.parameters()], lr=2e-2)
        for _ in range(300):  # stage 2: routers minimize the surrogate's loss plus the latency loss
            plans = [r.train()(x, budget_ids=b) for r in routers]
            loss = surrogate([p.logits_TE for p in plans]) + latency_weight * latency_loss(plans, table, 0.5)
            opt_r.zero_grad()
            loss.backward()
            opt_r.step()
        with torch.no_grad():
            plans = [r.eval()(x, budget_ids=b) for r in routers]
            lat = sum(float(p.scores_TE.mean(0) @ table[i]) for i, p in enumerate(plans))
        return lat / float(table[:, -1].sum()), [p.expert_ids_TK[0, 0].item() for p in plans]

    lat, choices = train_routers(latency_weight=0.0)  # the surrogate alone asks for the full width
    assert lat > 0.9 and choices == [2, 2]
    lat, choices = train_routers(latency_weight=50.0)
    assert abs(lat - 0.5) < 0.03 and choices == [1, 1]  # the width whose latency meets the budget


def test_options_and_inputs_are_validated():
    with pytest.raises(ValueError, match="width_choices"):
        FlextronRouter(8, 3, width_choices=(0.5, 0.25, 1.0))
    with pytest.raises(ValueError, match="len\\(width_choices\\)"):
        FlextronRouter(8, 4, width_choices=(0.5, 1.0))
    with pytest.raises(ValueError, match="k=1"):
        FlextronRouter(8, 3, k=2)
    with pytest.raises(TypeError, match="budget_ids"):
        FlextronRouter(8, 3)(torch.randn(2, 8))
    mlp = ElasticMLP(8, 16, width_choices=(0.5, 1.0))
    with pytest.raises(ValueError, match="width"):
        mlp(
            torch.randn(3, 8),
            FlextronRouter(8, 3).eval()(torch.randn(3, 8), budget_ids=torch.zeros(3).long()),
        )
