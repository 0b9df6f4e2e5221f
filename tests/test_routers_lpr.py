"""Latent Prototype Routing: cosine routing of the latent mean, the KL, diversity and alignment terms on
hand-checked values, and near-balanced loads from the geometry alone on a skewed stream."""

from __future__ import annotations

import torch
from torch import nn

import impls
from impls.routers.token_choice.latent_prototype import LPR_MIXTRAL, LPR_QWEN3, LPRRouter, gram_to_identity


def test_routing_is_the_top_k_cosine_of_the_latent_mean():
    torch.manual_seed(0)
    r = LPRRouter(8, 6, k=2, latent_dim=3)
    x = torch.randn(10, 8)
    plan = r(x)
    h = nn.functional.silu(nn.functional.layer_norm(x, (8,), r.norm.weight, r.norm.bias))
    mu = (h @ r.encoder.weight.T + r.encoder.bias)[:, :3]
    cos = nn.functional.cosine_similarity(mu[:, None], r.prototypes[None], dim=-1)
    top, ids = cos.topk(2, -1)
    assert torch.equal(plan.expert_ids_TK, ids)
    torch.testing.assert_close(plan.weights_TK, torch.softmax(top, -1))
    r.train()
    assert torch.equal(r(x).expert_ids_TK, ids)  # the sample z never routes


def test_loss_terms_on_hand_checked_values():
    assert float(gram_to_identity(torch.eye(3))) == 0.0
    # two identical rows: Gram of normalized rows is all ones, (ones - I)^2 has two 1s in 4 entries
    torch.testing.assert_close(gram_to_identity(torch.tensor([[1.0, 0.0], [2.0, 0.0]])), torch.tensor(0.5))
    r = LPRRouter(4, 2, k=1, latent_dim=2, token_diversity=False).eval()
    with torch.no_grad():
        r.prototypes.copy_(torch.eye(2))
        r.encoder.weight.zero_()
        r.encoder.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # mu = (1, 0), log var = 0
    plan = r(torch.randn(3, 4))
    torch.testing.assert_close(plan.losses["lpr_kl"], torch.tensor(0.5))  # -1/2 (1 + 0 - 1 - 1)
    assert float(plan.losses["lpr_diversity"]) == 0.0  # orthonormal prototypes
    # every token routes to prototype 0 with weight 1; R = softmax([1, 0]) puts e/(1+e) on expert 0;
    # the centroid target of both prototypes is mu = (1, 0) (eval: z = mu)
    torch.testing.assert_close(plan.losses["lpr_align"], torch.tensor((0 + 0 + 1 + 1) / 4))


def test_geometry_balances_a_skewed_stream_without_a_usage_penalty():
    torch.manual_seed(0)
    r = LPRRouter(16, 8, k=2, latent_dim=8)
    opt = torch.optim.Adam(r.parameters(), lr=1e-2)
    skew = torch.randn(16) * 2

    def max_over_mean():
        with torch.no_grad():
            ids = r.eval()(torch.randn(2048, 16) * 0.5 + skew).expert_ids_TK
        r.train()
        c = torch.bincount(ids.flatten(), minlength=8).float()
        return float(c.max() / c.mean())

    before = max_over_mean()
    for _ in range(600):
        loss = r(torch.randn(128, 16) * 0.5 + skew).losses["lpr"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = max_over_mean()
    assert before > 3.0 and after < 1.5


def test_aligned_input_and_presets():
    torch.manual_seed(0)
    r = LPRRouter(8, 4, k=2, latent_dim=3)
    x = torch.randn(2, 5, 8)
    plan = r(x)
    v = torch.softmax(plan.logits_TE, -1) @ r.prototypes
    torch.testing.assert_close(
        r.aligned_input(x, plan), x + (v @ r.aligner.weight.T + r.aligner.bias).view(2, 5, 8)
    )
    assert LPR_QWEN3.options["align_weight"] == 0.1 and LPR_MIXTRAL.options["align_weight"] == 0.05
    assert LPR_QWEN3.num_experts == 128 and LPR_QWEN3.options["k"] == 8
    assert LPR_QWEN3.loss_coefficients == {"lpr": 0.01}
    assert impls.build_router("lpr_qwen3", d_model=16).config.latent_dim == 16
