"""Production presets of 2025: OLMoE, Qwen3-MoE and gpt-oss, against their published configurations
(each test states its source), and gpt-oss's router against the reference code's steps."""

from __future__ import annotations

import torch

import impls
from impls.routers.token_choice.topk import (
    GPT_OSS_20B,
    GPT_OSS_120B,
    OLMOE_1B_7B,
    QWEN3_30B_A3B,
    QWEN3_235B_A22B,
)


def test_olmoe_matches_its_training_config():
    # allenai/OLMoE configs/olmoe-8x1b-...yml: moe_num_experts 64, moe_top_k 8, dropless,
    # moe_loss_weight 0.01, moe_zloss_weight 0.001; HF OlmoeConfig: norm_topk_prob false
    assert OLMOE_1B_7B.num_experts == 64 and OLMOE_1B_7B.options == {"k": 8, "normalize": False}
    assert OLMOE_1B_7B.loss_coefficients == {"load_balance": 0.01, "z_loss": 0.001}


def test_qwen3_matches_its_released_configs():
    # Qwen3-30B-A3B / 235B-A22B config.json (copies): num_experts 128, num_experts_per_tok 8,
    # norm_topk_prob true, router_aux_loss_coef 0.001, no shared expert; global-batch balance loss
    for p in (QWEN3_30B_A3B, QWEN3_235B_A22B):
        assert p.num_experts == 128 and p.options == {"k": 8, "normalize": True, "global_balance": True}
        assert p.loss_coefficients == {"global_load_balance": 0.001}
        assert "num_shared_experts" not in p.layer


def test_gpt_oss_router_is_biased_linear_top4_then_softmax_over_the_four():
    # openai/gpt-oss gpt_oss/torch/model.py MLPBlock: gate = Linear(hidden, E) with bias,
    # topk(k=4, sorted=True), softmax over the 4 values; 120b: 128 experts, 20b: 32
    assert GPT_OSS_120B.num_experts == 128 and GPT_OSS_20B.num_experts == 32
    torch.manual_seed(0)
    r = impls.build_router("gpt_oss_20b", d_model=16)
    x = torch.randn(7, 16)
    g = x @ r.gate.weight.T + r.gate.bias
    vals, idx = torch.topk(g, k=4, dim=-1, sorted=True)
    plan = r(x)
    assert torch.equal(plan.expert_ids_TK.sort(-1).values, idx.sort(-1).values)
    w = torch.zeros(7, 32).scatter(1, idx, torch.softmax(vals, -1))
    got = torch.zeros(7, 32).scatter(1, plan.expert_ids_TK, plan.weights_TK)
    torch.testing.assert_close(got, w)
