"""DSelect-k (Hazimeh et al., NeurIPS 2021): smooth-step, binary selectors, exactly k experts."""

from __future__ import annotations

import math

import pytest
import torch

import impls
from impls.routers.token_choice.dselect_k import binary_codes, smooth_step


def test_smooth_step_matches_the_papers_formula_on_hand_checked_values():
    t = torch.tensor([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 2.0])
    # gamma = 1: 0 below -1/2, 1 above 1/2, -2 t^3 + 3/2 t + 1/2 between
    expected = torch.tensor([0.0, 0.0, 0.15625, 0.5, 0.84375, 1.0, 1.0])
    torch.testing.assert_close(smooth_step(t, 1.0), expected)
    # continuously differentiable: the cubic's slope is 0 at +-gamma/2 (gamma = 2 here)
    s = torch.tensor([-0.999, 0.999, 0.0], requires_grad=True)
    smooth_step(s, 2.0).sum().backward()
    assert s.grad[0].abs() < 1e-2 and s.grad[1].abs() < 1e-2 and s.grad[2] == pytest.approx(0.75)


def test_binary_codes_are_most_significant_bit_first():
    assert binary_codes(8)[5].tolist() == [True, False, True]
    assert binary_codes(6).shape == (6, 3) and binary_codes(2).tolist() == [[False], [True]]
    assert binary_codes(1).shape == (1, 0)


def _static(num_experts: int, k: int, values: list[float]) -> impls.Router:
    gate = impls.build_router("dselect_k", d_model=4, num_experts=num_experts, k=k, conditioning="static")
    with torch.no_grad():
        gate.static_logits.copy_(torch.tensor(values))
    return gate


def test_saturated_selectors_pick_exactly_their_coded_experts():
    # selector 1 codes expert 5 (101), selector 2 expert 2 (010); softmax(0, log 3) = (1/4, 3/4)
    gate = _static(8, 2, [1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 0.0, math.log(3.0)])
    plan = gate.train()(torch.randn(3, 4))
    expected = torch.zeros(8)
    expected[5], expected[2] = 0.25, 0.75
    torch.testing.assert_close(plan.weights_TK, expected.expand(3, 8))
    assert plan.keep_TK.sum(-1).tolist() == [2, 2, 2] and (plan.experts_per_token == 2)
    assert float(plan.losses["entropy"].detach()) == pytest.approx(0.0, abs=1e-5)  # binary selectors


def _reference_q(z: torch.Tensor, alpha: torch.Tensor, num_experts: int, gamma: float) -> torch.Tensor:
    """The paper's definition (Sec. 3), written out with loops."""
    k, m = z.shape
    q = torch.zeros(num_experts, dtype=torch.float64)
    w = torch.softmax(alpha.double(), 0)
    for i in range(k):
        for e in range(num_experts):
            bits = [(e >> (m - 1 - j)) & 1 for j in range(m)]
            r = 1.0
            for j in range(m):
                s = float(smooth_step(z[i, j].double(), gamma))
                r *= s if bits[j] else 1.0 - s
            q[e] += w[i] * r
    return q


@pytest.mark.parametrize(("num_experts", "k", "gamma"), [(8, 2, 1.0), (16, 3, 2.0), (5, 2, 1.0)])
def test_the_gate_equals_a_restatement_of_the_papers_equations(num_experts, k, gamma):
    g = torch.Generator().manual_seed(num_experts)
    m = math.ceil(math.log2(num_experts))
    z = (torch.rand(k, m, generator=g) - 0.5) * gamma  # inside and around the polynomial region
    alpha = torch.randn(k, generator=g)
    gate = impls.build_router(
        "dselect_k", d_model=4, num_experts=num_experts, k=k, gamma=gamma, conditioning="static"
    )
    with torch.no_grad():
        gate.static_logits.copy_(torch.cat([z.flatten(), alpha]))
    plan = gate.eval()(torch.randn(2, 4))
    ref = _reference_q(z, alpha, num_experts, gamma).float()
    torch.testing.assert_close(plan.scores_TE[0], ref, atol=1e-6, rtol=1e-5)


def test_training_converges_to_exactly_k_nonzero_weights():
    """A target that needs two experts: both selectors saturate on distinct experts (3 and 5)."""
    torch.manual_seed(0)
    gate = impls.build_router("dselect_k", d_model=4, num_experts=8, k=2, conditioning="static").train()
    target = torch.zeros(8)
    target[3] = target[5] = 0.5
    opt = torch.optim.Adam(gate.parameters(), lr=0.05)
    x = torch.randn(4, 4)
    for _ in range(600):
        plan = gate(x)
        loss = ((plan.weights_TK[0] - target) ** 2).sum() + plan.aux_loss({"entropy": 1e-2})
        opt.zero_grad()
        loss.backward()
        opt.step()
    plan = gate(x)
    assert plan.keep_TK.sum(-1).tolist() == [2, 2, 2, 2]
    assert (plan.weights_TK[0] > 0).nonzero().flatten().tolist() == [3, 5]
    torch.testing.assert_close(plan.weights_TK[0], target, atol=1e-3, rtol=0)


def test_unreachable_codes_are_penalized_when_the_expert_count_is_not_a_power_of_two():
    # E = 6, m = 3: codes 110 and 111 name no expert; this selector sits on 111
    gate = _static(6, 1, [1.0, 1.0, 1.0, 0.0])
    plan = gate.train()(torch.randn(2, 4))
    assert float(plan.weights_TK.sum()) == 0.0 and gate.combine_normalization == "at_most_one"
    assert torch.isfinite(plan.losses["reachability"]) and float(plan.losses["reachability"]) > 1e5
    assert "reachability" not in _static(8, 1, [0.0, 0.0, 0.0, 0.0])(torch.randn(2, 4)).losses


def test_the_per_example_gate_routes_tokens_differently_and_learns():
    torch.manual_seed(1)
    gate = impls.build_router("dselect_k", d_model=8, num_experts=8, k=2).train()
    with torch.no_grad():
        gate.gate.weight.mul_(400.0)  # leave the polynomial region: near-binary selectors
    x = torch.randn(64, 8)
    plan = gate(x)
    assert len({tuple(r) for r in plan.keep_TK.int().tolist()}) > 1
    (plan.weights_TK[:, 0].sum() + plan.losses["entropy"]).backward()
    assert gate.gate.weight.grad is not None and torch.isfinite(gate.gate.weight.grad).all()
