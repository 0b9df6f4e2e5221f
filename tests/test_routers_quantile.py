"""Quantile Balancing: Su's solver gives exactly k T / E tokens per expert on a micro-batch with distinct
scores; one step of K3's Eq. 13-14 on hand-checked margins; the bias never enters the weights; the
exact and the global-batch histogram variants balance a skewed stream; the histogram decodes the
exact quantile to within one bin."""

from __future__ import annotations

import pytest
import torch

import impls
from impls.routers.token_choice.quantile import (
    QuantileBalancingRouter,
    decode_histogram_quantile,
    quantile_bias_step,
    solve_quantile_bias,
)


@pytest.mark.parametrize(("T", "E", "k"), [(64, 8, 2), (96, 6, 1), (48, 12, 3)])
def test_solver_gives_exactly_kT_over_E_per_expert(T, E, k):
    torch.manual_seed(T + E + k)
    s = torch.rand(T, E) + torch.linspace(0, 0.6, E)  # skewed towards the last experts, distinct
    b = solve_quantile_bias(s, k)
    ids = (s + b).topk(k, dim=-1).indices
    assert torch.bincount(ids.flatten(), minlength=E).tolist() == [T * k // E] * E
    assert abs(float(b.sum())) < 1e-5  # mean-centred


def test_one_step_on_hand_checked_margins():
    # 4 tokens, 2 experts, k = 1, q = 2; zero bias: alpha_i = the second (smaller) score of token i
    s = torch.tensor([[0.9, 0.1], [0.8, 0.3], [0.7, 0.6], [0.6, 0.5]])
    b = quantile_bias_step(s, torch.zeros(2), 1)
    # margins s - alpha: expert 0 -> [0.8, 0.5, 0.1, 0.1], expert 1 -> [0, 0, 0, 0]
    # b_hat = -(3rd largest) = [-0.1, 0.0], mean-centred -> [-0.05, 0.05]
    torch.testing.assert_close(b, torch.tensor([-0.05, 0.05]))
    # against the old cutoffs exactly q = 2 tokens of each expert clear them (uncentred b_hat)
    alpha = s.min(-1, keepdim=True).values
    b_hat = torch.tensor([-0.1, 0.0])
    assert int(((s[:, 0] + b_hat[0]) > alpha[:, 0] + 1e-6).sum()) == 2


def test_padding_is_left_out_of_the_quantile():
    s = torch.tensor([[0.9, 0.1], [0.8, 0.3], [0.7, 0.6], [0.6, 0.5], [0.0, 1.0]])
    mask = torch.tensor([True, True, True, True, False])
    torch.testing.assert_close(quantile_bias_step(s, torch.zeros(2), 1, mask), torch.tensor([-0.05, 0.05]))


def test_histogram_decodes_the_exact_quantile_within_one_bin():
    torch.manual_seed(0)
    r = torch.rand(1000, 3) * 2 - 1  # values in [-1, 1]
    low, width, B = torch.tensor(-1.0), torch.tensor(2.0 / 200), 200
    bins = ((r - low) / width).floor().clamp(0, B - 1).long()
    hist = torch.zeros(3, B).scatter_add_(1, bins.T, torch.ones(3, 1000))
    q = torch.tensor(250.0)
    got = decode_histogram_quantile(hist, q, low, width)
    exact = r.sort(0).values[249:251].mean(0)
    assert torch.all((got - exact).abs() <= float(width))


def test_bias_selects_but_never_weights():
    torch.manual_seed(0)
    r = QuantileBalancingRouter(8, 4, k=2)
    x = torch.randn(10, 8)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([5.0, 0.0, 0.0, -5.0]))
    plan = r.eval()(x)
    assert torch.all((plan.expert_ids_TK == 0).any(-1)) and not torch.any(plan.expert_ids_TK == 3)
    s = torch.sigmoid(x @ r.gate.weight.T)
    w = s.gather(1, plan.expert_ids_TK)
    torch.testing.assert_close(plan.weights_TK, w / w.sum(-1, keepdim=True))
    assert set(plan.losses) == {"z_loss"}  # no auxiliary balance loss


@pytest.mark.parametrize("mode", ["exact", "histogram"])
def test_balances_a_skewed_stream_and_eval_updates_nothing(mode):
    torch.manual_seed(0)
    r = QuantileBalancingRouter(16, 8, k=2, quantile_mode=mode)
    with torch.no_grad():
        r.gate.weight.add_(torch.randn(8, 16) * 0.5)
    skew = torch.randn(16) * 1.5

    def max_over_mean():
        with torch.no_grad():
            ids = r.eval()(torch.randn(4096, 16) + skew).expert_ids_TK
        r.train()
        c = torch.bincount(ids.flatten(), minlength=8).float()
        return float(c.max() / c.mean())

    before = max_over_mean()
    for _ in range(40):
        for _micro in range(2):  # gradient accumulation: both micro-batches pool into one step
            r(torch.randn(256, 16) + skew)
        impls.step_routers(r)
    after = max_over_mean()
    assert before > 1.8 and after < 1.2
    b = r.expert_bias.clone()
    r.eval()(torch.randn(64, 16))
    r.update_bias()  # nothing collected in eval: the bias stays
    assert torch.equal(r.expert_bias, b)


def test_validation():
    with pytest.raises(ValueError, match="n_group"):
        QuantileBalancingRouter(8, 8, n_group=2, topk_group=1)
    with pytest.raises(ValueError, match="histogram"):
        QuantileBalancingRouter(8, 8, quantile_mode="histogram", score_func="sqrt_softplus")
    with pytest.raises(ValueError, match="aux_free_bias"):
        QuantileBalancingRouter(8, 8, aux_free_bias=False)
