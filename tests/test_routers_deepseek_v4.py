"""DeepSeek-V4 and Kimi K2: sqrt-softplus affinities, hash layers that route by token id only, the
greedy token-id table, the layer stack, and the presets against the published configurations."""

from __future__ import annotations

import math

import pytest
import torch

import impls
from impls.routers.token_choice.deepseek import KIMI_K2
from impls.routers.token_choice.deepseek_v4 import (
    DEEPSEEK_V4_FLASH,
    DEEPSEEK_V4_FLASH_HASH,
    DEEPSEEK_V4_PRO,
    DEEPSEEK_V4_PRO_HASH,
    DeepSeekV4HashRouter,
    deepseek_v4_routers,
    hash_table,
)


def test_sqrt_softplus_affinities_and_selection_only_bias():
    r = impls.build_router(
        "deepseek", d_model=2, num_experts=3, k=2, score_func="sqrt_softplus", normalize=True
    )
    with torch.no_grad():
        r.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    plan = r(torch.tensor([[2.0, 0.5]]))
    s = torch.tensor([math.sqrt(math.log1p(math.exp(h))) for h in (2.0, 0.5, -2.0)])
    torch.testing.assert_close(r.affinities(plan.logits_TE)[0], s)
    torch.testing.assert_close(plan.scores_TE[0], s / s.sum())  # reported normalized over the experts
    assert plan.expert_ids_TK.tolist() == [[0, 1]]
    torch.testing.assert_close(plan.weights_TK[0], s[:2] / s[:2].sum())


def test_hash_layer_routes_by_token_id_only():
    torch.manual_seed(0)
    r = DeepSeekV4HashRouter(8, 16, vocab_size=50)
    ids = torch.randint(0, 50, (3, 7))
    a = r(torch.randn(3, 7, 8), token_ids=ids)
    b = r(torch.randn(3, 7, 8) * 10, token_ids=ids)
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    assert torch.equal(a.expert_ids_TK, r.tid2eid[ids.reshape(-1)])
    x = torch.randn(3, 7, 8)
    plan = r(x, token_ids=ids)
    s = torch.sqrt(torch.nn.functional.softplus(x.reshape(-1, 8) @ r.gate.weight.T))
    w = s.gather(1, plan.expert_ids_TK)
    torch.testing.assert_close(plan.weights_TK, 1.5 * w / w.sum(-1, keepdim=True))
    assert set(plan.losses) == {"z_loss"} and not r.config.aux_free_bias


def test_hash_table_gives_distinct_experts_and_balances_expected_load():
    t = hash_table(120, 8, 3)
    assert t.shape == (120, 3)
    assert all(len(set(row)) == 3 for row in t.tolist())
    assert torch.bincount(t.flatten(), minlength=8).tolist() == [45] * 8
    # greedy by frequency: the most frequent id takes experts 0 and 1 (ties: lower index), its load
    # 5 each; the next (2) takes 2 and 3; the third (2) takes 4 and 5
    counts = torch.tensor([4.0, 10.0, 4.0])
    t = hash_table(3, 6, 2, counts_V=counts)
    assert t[1].tolist() == [0, 1] and t[0].tolist() == [2, 3] and t[2].tolist() == [4, 5]


def test_the_stack_hashes_the_first_three_layers():
    routers = deepseek_v4_routers(16, 6, variant="pro", vocab_size=40, num_experts=12)
    kinds = [type(r).__name__ for r in routers]
    assert kinds == ["DeepSeekV4HashRouter"] * 3 + ["DeepSeekRouter"] * 3
    assert not torch.equal(routers[0].tid2eid, routers[1].tid2eid)  # a table per layer
    assert all(r.config.routed_scaling_factor == 2.5 for r in routers)
    with pytest.raises(ValueError, match="num_hash_layers"):
        deepseek_v4_routers(16, 2, vocab_size=40)


def test_presets_match_the_published_configurations():
    # DeepSeek-V4 paper Sec. 4.2 and the released config.json files: Flash 256 / Pro 384 routed experts,
    # 1 shared, top-6, scoring_func sqrtsoftplus, norm_topk_prob true, routed_scaling_factor 1.5 / 2.5,
    # num_hash_layers 3, no n_group, bias update speed 0.001, sequence-wise balance weight 1e-4
    for p, E, gamma in ((DEEPSEEK_V4_FLASH, 256, 1.5), (DEEPSEEK_V4_PRO, 384, 2.5)):
        assert p.num_experts == E and p.layer["num_shared_experts"] == 1
        o = p.options
        assert (o["k"], o["score_func"], o["normalize"], o["routed_scaling_factor"]) == (
            6,
            "sqrt_softplus",
            True,
            gamma,
        )
        assert o["aux_free_bias"] and o["bias_update_rate"] == 1e-3 and "n_group" not in o
        assert p.loss_coefficients == {"seq_load_balance": 1e-4}
    for p, E, gamma in ((DEEPSEEK_V4_FLASH_HASH, 256, 1.5), (DEEPSEEK_V4_PRO_HASH, 384, 2.5)):
        assert p.num_experts == E and p.options["routed_scaling_factor"] == gamma and p.options["k"] == 6
        assert p.options["vocab_size"] == 129280
    # Kimi K2 config.json: n_routed_experts 384, num_experts_per_tok 8, n_shared_experts 1, sigmoid,
    # noaux_tc, n_group 1, routed_scaling_factor 2.827, norm_topk_prob true, aux_loss_alpha 0.001 (seq_aux)
    o = KIMI_K2.options
    assert KIMI_K2.num_experts == 384 and KIMI_K2.layer["num_shared_experts"] == 1
    assert (o["k"], o["score_func"], o["normalize"], o["routed_scaling_factor"]) == (
        8,
        "sigmoid",
        True,
        2.827,
    )
    assert o["aux_free_bias"] and "n_group" not in o
    assert KIMI_K2.loss_coefficients == {"seq_load_balance": 1e-3}
