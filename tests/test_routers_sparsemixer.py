"""SparseMixer-v2 (GRIN, arXiv 2409.12136, App. A): the top-k router's ``estimator="sparsemixer"``.

Hand-checked masks and weights, the sampling distribution and the 1 / (1/3) forward factor, the
straight-through router gradient, and a plain restatement of the released two-slot algorithm (an
autograd Function with the custom backward ``g * pi_D * (delta - pi)``) fed the same random draws.
"""

from __future__ import annotations

import math

import pytest
import torch

import impls
from impls.routers.token_choice.topk import GRIN_MOE, TopKRouter, sparsemixer_topk


# ------------------------------------------------------------------ plain restatement (k = 2)
class _Multiplier(torch.autograd.Function):
    """Forward ``pi_D * c``; backward to the logits only, ``g * pi_D * (onehot(D) - pi)`` (App. A.2)."""

    @staticmethod
    def forward(ctx, scores, pi_D, sel, pi, c):
        ctx.save_for_backward(pi_D, sel, pi)
        return pi_D * c

    @staticmethod
    def backward(ctx, g):
        pi_D, sel, pi = ctx.saved_tensors
        gp = g * pi_D
        grad = -pi * gp
        grad = grad.scatter_add(1, sel, gp)
        return grad, None, None, None, None


def sparsemixer_reference(scores, eps, training):
    """The released two-slot SparseMixer-v2 restated (same order of random draws per slot)."""
    ids, mults = [], []
    current = scores
    for slot in range(2):
        with torch.no_grad():
            best, best_ind = current.max(-1, keepdim=True)
            ratio = (best - scores) / scores.abs().clamp(min=best)
            masked = ratio > 2 * eps
        gates = current.masked_fill(masked, float("-inf"))
        if training:
            with torch.no_grad():
                sel = (gates - torch.empty_like(gates).exponential_().log()).max(-1)[1].unsqueeze(-1)
            pi = torch.softmax(gates, -1).detach()
            pi_D = pi.gather(-1, sel)
            keep = (sel == pi.max(-1)[1].unsqueeze(-1)) | (torch.rand_like(best) > 0.75)
            c = torch.where(keep, 1.0, 1.0 / 3.0)
            mult = _Multiplier.apply(scores, pi_D, sel, pi, c)
        else:
            sel = best_ind
            mult = torch.softmax(gates, -1).gather(-1, sel)
        ids.append(sel)
        mults.append(mult)
        if slot == 0:
            current = torch.scatter(scores, -1, sel, float("-inf"))
    return torch.cat(ids, -1), torch.cat(mults, -1)


# ------------------------------------------------------------------ hand-checked values
def test_hand_checked_masks_and_weights_in_eval():
    # z* = 2: 1.99 is 0.005 away (kept, <= 0.02), 1.0 and 0.0 are 0.5 and 1.0 away (masked).
    z = torch.tensor([[2.0, 1.99, 1.0, 0.0]])
    ids, w = sparsemixer_topk(z, 2, 0.01, training=False)
    assert ids.tolist() == [[0, 1]]
    # slot 1: softmax over {2, 1.99}; slot 2: z* = 1.99 and only expert 1 survives, weight 1
    torch.testing.assert_close(w, torch.tensor([[1 / (1 + math.exp(-0.01)), 1.0]]))


def test_all_equal_logits_keep_every_expert_and_negative_logits_use_their_magnitude():
    ids, w = sparsemixer_topk(torch.zeros(1, 4), 2, 0.01, training=False)  # 0/0: every expert kept
    torch.testing.assert_close(w, torch.tensor([[0.25, 1 / 3]]))
    # z* = -1: expert 1 at -1.01 is 0.01/1.01 away (kept), expert 2 at -1.1 is 0.1/1.1 away (masked)
    z = torch.tensor([[-1.0, -1.01, -1.1]])
    ids, w = sparsemixer_topk(z, 1, 0.01, training=False)
    assert ids.tolist() == [[0]]
    torch.testing.assert_close(w, torch.tensor([[1 / (1 + math.exp(-0.01))]]))


def test_training_samples_the_masked_softmax_and_scales_by_one_or_a_third():
    torch.manual_seed(0)
    T = 40000
    z = torch.tensor([[2.0, 1.99, 1.98, 1.0, -3.0]]).expand(T, 5)
    ids, w = sparsemixer_topk(z, 1, 0.01, training=True)
    pi = torch.softmax(torch.tensor([2.0, 1.99, 1.98]), -1)
    freq = torch.bincount(ids[:, 0], minlength=5).double() / T
    assert freq[3:].sum() == 0  # masked experts are never sampled
    assert torch.allclose(freq[:3], pi.double(), atol=0.01)
    pi_D = pi[ids[:, 0].clamp(max=2)]
    c = w[:, 0].detach() / pi_D
    assert torch.allclose(c[ids[:, 0] == 0], torch.tensor(1.0))  # the argmax is never scaled down
    other = c[ids[:, 0] != 0]
    full = (other - 1).abs() < 1e-5
    assert torch.all(full | ((other - 1 / 3).abs() < 1e-5))
    assert abs(full.double().mean().item() - 0.25) < 0.015  # Bernoulli(1/4)


def test_router_gradient_is_the_masked_softmax_jacobian_whatever_the_factor():
    torch.manual_seed(3)
    z = torch.tensor([[0.5, 0.49, 0.495, -2.0]] * 64, requires_grad=True)
    ids, w = sparsemixer_topk(z, 1, 0.02, training=True)
    g = torch.randn(64, 1)
    (w * g).sum().backward()
    keep = torch.tensor([True, True, True, False])
    pi = torch.softmax(z.detach().masked_fill(~keep, float("-inf")), -1)
    D = ids[:, 0]
    pi_D = pi.gather(1, ids)
    expected = g * pi_D * (torch.nn.functional.one_hot(D, 4) - pi)
    torch.testing.assert_close(z.grad, expected)
    assert torch.all(z.grad[:, 3] == 0)


@pytest.mark.parametrize("training", [False, True])
def test_matches_the_restated_release_with_the_same_draws(training):
    g = torch.Generator().manual_seed(7)
    scores = (torch.randn(300, 6, generator=g) * 0.02 + torch.linspace(0, 0.01, 6)).requires_grad_()
    scores2 = scores.detach().clone().requires_grad_()
    torch.manual_seed(11)
    ids, w = sparsemixer_topk(scores, 2, 0.01, training=training)
    torch.manual_seed(11)
    ref_ids, ref_w = sparsemixer_reference(scores2, 0.01, training)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-7)
    up = torch.randn(300, 2, generator=g)
    (w * up).sum().backward()
    (ref_w * up).sum().backward()
    torch.testing.assert_close(scores.grad, scores2.grad, rtol=1e-5, atol=1e-7)
    assert (ids[:, 0] != ids[:, 1]).all()


def test_router_option_eval_is_deterministic_and_any_k_picks_distinct_experts():
    torch.manual_seed(0)
    r = TopKRouter(8, 6, k=3, estimator="sparsemixer", sparsemixer_eps=0.5)
    x = torch.randn(50, 8)
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK) and torch.equal(a.weights_TK, b.weights_TK)
    ids = a.expert_ids_TK.sort(-1).values
    assert (ids[:, 1:] != ids[:, :-1]).all()
    assert r.combine_normalization is None
    r.train()
    plan = r(x)
    ids = plan.expert_ids_TK.sort(-1).values
    assert (ids[:, 1:] != ids[:, :-1]).all()
    # the balance loss counts the experts actually chosen
    f = torch.zeros(6).scatter_add(0, plan.expert_ids_TK.flatten(), torch.ones(150)) / 150
    torch.testing.assert_close(plan.losses["load_balance"], 6 * (f * plan.scores_TE.mean(0)).sum())


def test_options_are_validated():
    with pytest.raises(ValueError, match="estimator"):
        TopKRouter(8, 4, estimator="gumbel")
    with pytest.raises(ValueError, match="sparsemixer_eps"):
        TopKRouter(8, 4, estimator="sparsemixer", sparsemixer_eps=-0.1)
    TopKRouter(8, 4, k=1, estimator="sparsemixer")  # k = 1: the weight pi_D still carries a gradient


def test_grin_preset_matches_the_released_config():
    # microsoft/GRIN-MoE config.json: num_local_experts 16, num_experts_per_tok 2,
    # router_jitter_noise 0.01 (the mask eps), input_jitter_noise 0.01, router_aux_loss_coef 0.0
    assert GRIN_MOE.num_experts == 16
    released = {"k": 2, "estimator": "sparsemixer", "sparsemixer_eps": 0.01, "jitter_eps": 0.01}
    assert GRIN_MOE.options == released
    assert GRIN_MOE.loss_coefficients == {"load_balance": 0.0}
    r = impls.build_router("grin_moe", d_model=16)
    assert r.num_experts == 16 and r.config.k == 2
