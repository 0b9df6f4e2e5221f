"""ModuleFormer: the MLP gate with raw top-k probabilities, the mutual-information and load-concentration
losses on hand-checked values, stick-breaking attention against its product definition, and the
attention mixture against a per-expert restatement."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import impls
from impls.routers.token_choice.moduleformer import (
    MOLM_700M_8B,
    ModuleFormerAttention,
    ModuleFormerRouter,
    mutual_information_loss,
    stick_breaking_attention,
)


def test_gate_is_the_released_mlp_with_raw_topk_probabilities():
    torch.manual_seed(0)
    r = ModuleFormerRouter(12, 6, k=2, gating_size=8)
    x = torch.randn(30, 12)
    plan = r(x)
    # the released gate restated: Linear(d, 256) + bias -> GELU -> Linear(256, E) without bias
    w1, b1, w2 = r.mlp[0].weight, r.mlp[0].bias, r.mlp[2].weight
    assert r.mlp[2].bias is None
    probs = torch.softmax(nn.functional.gelu(x @ w1.T + b1) @ w2.T, dim=1)
    top, ids = probs.topk(2, dim=1)
    assert torch.equal(plan.expert_ids_TK, ids)
    torch.testing.assert_close(plan.weights_TK, top)  # not renormalized
    assert torch.all(plan.weights_TK.sum(-1) < 1)
    h_cond = -(probs * probs.log()).sum(-1).mean()
    p = probs.mean(0)
    h = -(p * torch.log(p + 1e-8)).sum()
    torch.testing.assert_close(plan.losses["mutual_information"], h_cond - h)
    torch.testing.assert_close(plan.losses["load_concentration"], h)


def test_mutual_information_loss_on_hand_checked_distributions():
    # confident and spread over the batch: H(e|x) = 0, H(e) = log 2 -> -log 2 (the minimum)
    mi, conc = mutual_information_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(mi, torch.tensor(-math.log(2)), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(conc, torch.tensor(math.log(2)), atol=1e-7, rtol=1e-6)
    # uniform for every token: H(e|x) = H(e) = log 4 -> 0 (no information)
    mi, conc = mutual_information_loss(torch.full((3, 4), 0.25))
    assert abs(float(mi)) < 1e-6 and abs(float(conc) - math.log(4)) < 1e-6
    # every token confident in the same module: both entropies 0 (collapsed, concentrated)
    mi, conc = mutual_information_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert abs(float(mi)) < 1e-6 and abs(float(conc)) < 1e-6
    # padding is excluded: the third token does not count
    mi, _ = mutual_information_loss(
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([True, True, False])
    )
    torch.testing.assert_close(mi, torch.tensor(-math.log(2)), atol=1e-7, rtol=1e-6)


def test_minimizing_the_mi_loss_spreads_the_batch_and_sharpens_each_token():
    torch.manual_seed(0)
    r = ModuleFormerRouter(8, 4, k=1, gating_size=16)
    x = torch.randn(256, 8)
    opt = torch.optim.Adam(r.parameters(), lr=1e-2)
    for _ in range(300):
        loss = r(x).losses["mutual_information"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    plan = r(x)
    assert float(plan.losses["mutual_information"].detach()) < -0.9 * math.log(4)
    counts = torch.bincount(plan.expert_ids_TK[:, 0], minlength=4)
    assert counts.min() > 256 / 4 * 0.5  # every module used


def sb_reference(q, k, v):
    """Stick-breaking attention written out: A_ij = z_ij * prod_{j<m<=i} (1 - z_im), j <= i."""
    L, C = q.shape
    z = torch.sigmoid(q @ k.T / math.sqrt(C))
    A = torch.zeros(L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(i + 1):
            a = z[i, j].double()
            for m in range(j + 1, i + 1):
                a = a * (1 - z[i, m].double())
            A[i, j] = a
    return A.float() @ v, A


def test_stick_breaking_attention_equals_its_product_definition():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 6, 4).unbind(0)
    y = stick_breaking_attention(q[None, None], k[None, None], v[None, None])[0, 0]
    ref, A = sb_reference(q, k, v)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    z = torch.sigmoid(q @ k.T / 2)
    # the token attends to itself first; the leftover mass prod_j (1 - z_ij) is dropped
    torch.testing.assert_close(A.diagonal().float(), z.diagonal())
    leftover = torch.stack([torch.prod(1 - z[i, : i + 1]) for i in range(6)])
    torch.testing.assert_close(A.sum(-1).float(), 1 - leftover)
    ones = stick_breaking_attention(q[None, None], k[None, None], torch.ones(1, 1, 6, 1))[0, 0, :, 0]
    assert torch.all(ones < 1)


def test_padded_keys_neither_take_nor_break_the_stick():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 1, 1, 5, 4).unbind(0)
    mask = torch.tensor([[True, False, True, True, False]])
    y = stick_breaking_attention(q, k, v, mask)
    keep = mask[0]
    ref, _ = sb_reference(q[0, 0][keep], k[0, 0][keep], v[0, 0][keep])
    torch.testing.assert_close(y[0, 0][keep], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("identity", [True, False])
def test_attention_mixture_equals_the_sum_of_weighted_expert_heads(identity):
    torch.manual_seed(0)
    D = 8
    kw = {} if identity else {"att_hidden": 6, "num_heads": 2}
    attn = ModuleFormerAttention(D, num_experts=3, k=2, **kw)
    assert isinstance(attn.k_proj, nn.Identity) == identity
    x = torch.randn(2, 5, D)
    y, plan = attn(x)
    w = torch.zeros(10, 3).scatter(1, plan.expert_ids_TK, plan.weights_TK).view(2, 5, 3)
    ref = torch.zeros_like(y)
    H = 1 if identity else 2
    for b in range(2):
        kk, vv = attn.k_proj(x[b]), attn.v_proj(x[b])
        for e in range(3):
            q = x[b] @ attn.q_proj[e]
            q, kk_h, vv_h = (t.view(5, H, -1) for t in (q, kk, vv))
            heads = [sb_reference(q[:, h], kk_h[:, h], vv_h[:, h])[0] for h in range(H)]
            out = torch.cat(heads, dim=-1) @ attn.o_proj[e]
            ref[b] += w[b, :, e : e + 1] * out
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_preset_matches_the_released_config():
    # ibm/MoLM-700M-8B config.json: n_mlp_experts 32, k_mlp 2, gating_size 256, aux_loss_type "mi",
    # aux_loss_weight 0; n_att_experts 16, k_att 2 (ModuleFormerAttention's defaults)
    assert MOLM_700M_8B.num_experts == 32
    assert MOLM_700M_8B.options == {"k": 2, "gating_size": 256, "aux_loss": "mi"}
    assert MOLM_700M_8B.loss_coefficients == {"mutual_information": 0.0}
    attn = ModuleFormerAttention(16)
    assert attn.num_experts == 16 and attn.router.config.k == 2
    r = impls.build_router("molm_700m_8b", d_model=16)
    assert r.mlp[0].out_features == 256


def test_switch_option_and_validation():
    r = ModuleFormerRouter(8, 4, aux_loss="switch")
    assert set(r(torch.randn(5, 8)).losses) == {"load_balance", "z_loss"}
    with pytest.raises(ValueError, match="aux_loss"):
        ModuleFormerRouter(8, 4, aux_loss="cv")
    with pytest.raises(ValueError, match="divisible"):
        ModuleFormerAttention(8, att_hidden=6, num_heads=4)
