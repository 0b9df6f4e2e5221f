"""MoA and MoH: with every head at weight 1 they are multi-head attention on the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from impls.routers.token_choice.attention_heads import (
    MixtureOfAttentionHeads,
    MixtureOfHeadsAttention,
    MoHRouter,
)


@pytest.mark.parametrize("causal", [False, True])
def test_moh_with_all_heads_at_weight_one_is_torch_multihead_attention(causal):
    torch.manual_seed(0)
    attn = MixtureOfHeadsAttention(16, num_heads=4, shared_heads=1, k=2)
    ref = nn.MultiheadAttention(16, 4, batch_first=True)
    ref.in_proj_weight.data.copy_(attn.in_proj_weight)
    ref.in_proj_bias.data.copy_(attn.in_proj_bias)
    ref.out_proj.load_state_dict(attn.out_proj.state_dict())
    x = torch.randn(2, 7, 16)
    y, _ = attn(x, causal=causal, head_weights=torch.ones(2, 7, 4))
    mask = nn.Transformer.generate_square_subsequent_mask(7) if causal else None
    expected, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_moa_with_all_heads_at_weight_one_is_multi_query_attention():
    torch.manual_seed(0)
    E, C = 4, 4
    attn = MixtureOfAttentionHeads(16, num_experts=E, head_dim=C, k=E)
    ref = nn.MultiheadAttention(16, E, batch_first=True)
    with torch.no_grad():
        q = torch.cat([attn.q_proj[i].T for i in range(E)])  # [E*C, D]
        kw = attn.k_proj.weight.repeat(E, 1)  # every head reads the shared key projection
        vw = attn.v_proj.weight.repeat(E, 1)
        ref.in_proj_weight.copy_(torch.cat([q, kw, vw]))
        ref.in_proj_bias.copy_(
            torch.cat([torch.zeros(E * C), attn.k_proj.bias.repeat(E), attn.v_proj.bias.repeat(E)])
        )
        ref.out_proj.weight.copy_(torch.cat([attn.o_proj[i] for i in range(E)]).T)
        ref.out_proj.bias.zero_()
    x = torch.randn(2, 5, 16)
    y, _ = attn(x, head_weights=torch.ones(2, 5, E))
    expected, _ = ref(x, x, x, need_weights=False)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_moa_router_weights_the_selected_heads_only():
    torch.manual_seed(1)
    attn = MixtureOfAttentionHeads(8, num_experts=4, head_dim=4, k=2, zero_init=False)
    x = torch.randn(1, 6, 8)
    y, plan = attn(x)
    w = torch.zeros(6, 4).scatter(1, plan.expert_ids_TK, plan.weights_TK).view(1, 6, 4)
    y_ref, _ = attn(x, head_weights=w)
    torch.testing.assert_close(y, y_ref)
    assert ((w > 0).sum(-1) == 2).all()


def test_moh_gates_follow_eq5_and_eq6():
    torch.manual_seed(2)
    r = MoHRouter(8, 3, k=2, shared_heads=2)  # 2 shared + 3 routed heads
    x = torch.randn(5, 8)
    plan = r(x)
    a = torch.softmax(x @ r.group_gate.weight.T, -1)  # Eq. 6
    p = torch.softmax(x @ r.gate.weight.T, -1)
    top, ids = p.topk(2)
    assert torch.equal(plan.expert_ids_TK, ids)
    torch.testing.assert_close(plan.weights_TK, a[:, 1:] * top)  # Eq. 5, routed
    shared = a[:, :1] * torch.softmax(x @ r.shared_gate.weight.T, -1)
    torch.testing.assert_close(r.shared_weights(x), shared)  # Eq. 5, shared
    f = torch.zeros(5, 3).scatter(1, ids, 1.0).mean(0)
    torch.testing.assert_close(plan.losses["load_balance"], (p.mean(0) * f).sum())  # Eq. 7


def test_moh_code_scaling_gives_uniform_routers_weight_one():
    r = MoHRouter(8, 4, k=2, shared_heads=2, code_scaling=True)
    for lin in (r.gate, r.shared_gate, r.group_gate):
        nn.init.zeros_(lin.weight)
    x = torch.randn(3, 8)
    torch.testing.assert_close(r(x).weights_TK, torch.ones(3, 2))
    torch.testing.assert_close(r.shared_weights(x), torch.ones(3, 2))
