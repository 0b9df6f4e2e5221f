"""Papers that use a standard gate with one twist: NLLB's Expert Output Masking, Z-code M3's Random
Token Selection, Chen et al.'s noisy top-1 routing from a zero gate."""

from __future__ import annotations

import pytest
import torch

import impls
from impls.routers.token_choice.gshard import GShardRouter
from impls.routers.token_choice.switch import SwitchRouter


# ---------------------------------------------------------------------------------- NLLB: EOM
def _pair(p_eom: float):
    torch.manual_seed(0)
    opts = dict(second_policy="all", renormalize_after_drop=True, capacity_factor=None)
    masked = GShardRouter(16, 8, expert_output_masking=p_eom, **opts)
    plain = GShardRouter(16, 8, **opts)
    plain.load_state_dict(masked.state_dict())
    return masked, plain


def test_eom_masks_whole_assignments_at_the_configured_rate_in_training_only():
    masked, plain = _pair(0.2)
    x = torch.randn(20000, 16)
    torch.manual_seed(1)
    m, p = masked.train()(x), plain.train()(x)
    assert torch.equal(m.expert_ids_TK, p.expert_ids_TK) and torch.equal(m.keep_TK, p.keep_TK)
    zeroed = m.weights_TK == 0
    assert abs(zeroed.float().mean().item() - 0.2) < 0.01
    # an assignment is either untouched or gone: no rescaling of the survivors
    torch.testing.assert_close(m.weights_TK[~zeroed], p.weights_TK[~zeroed])
    both = zeroed.all(-1).float().mean().item()  # first and second expert masked independently
    assert abs(both - 0.04) < 0.006
    # evaluation: no mask, every output scaled by 1 - p_eom
    me, pe = masked.eval()(x), plain.eval()(x)
    torch.testing.assert_close(me.weights_TK, 0.8 * pe.weights_TK)


def test_eom_zeroes_the_expert_output_vector_of_a_masked_token_in_the_layer():
    torch.manual_seed(0)
    layer = impls.MoELayer(16, 32, router="nllb_200", num_experts=4).train()
    x = torch.randn(64, 16)
    torch.manual_seed(5)
    out, plan = layer(x)
    gone = (plan.weights_TK == 0).all(-1)
    assert gone.any() and (~gone).any()
    assert torch.equal(out[gone], torch.zeros_like(out[gone]))
    assert (out[~gone].abs().sum(-1) > 0).all()


def test_renormalize_after_drop_gives_a_lone_survivor_weight_one():
    torch.manual_seed(0)
    r = GShardRouter(8, 2, second_policy="all", renormalize_after_drop=True, capacity_factor=0.5)
    plan = r.train()(torch.randn(16, 8))
    kept = plan.keep_TK.sum(-1)
    assert (kept == 1).any()
    torch.testing.assert_close(plan.weights_TK.sum(-1)[kept > 0], torch.ones(int((kept > 0).sum())))


def test_nllb_preset_values():
    p = impls.PRESETS["nllb_200"]
    assert p.num_experts == 128 and p.options["expert_output_masking"] == 0.2
    assert p.options["second_policy"] == "all" and p.loss_coefficients == {"load_balance": 1e-2}
    with pytest.raises(ValueError, match="expert_output_masking"):
        GShardRouter(8, 4, expert_output_masking=1.0)


# ---------------------------------------------------------------------------------- Z-code: RTS
def test_random_token_selection_keeps_a_uniform_subset_in_training_and_the_first_in_eval():
    r = SwitchRouter(4, 2, capacity_factor=1.0, drop_policy="random")
    with torch.no_grad():
        r.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    x = torch.zeros(8, 4)
    x[:, 0] = 1.0  # all 8 tokens choose expert 0, whose capacity is ceil(8 / 2) = 4
    counts = torch.zeros(8)
    torch.manual_seed(0)
    for _ in range(400):
        plan = r.train()(x)
        assert plan.keep_TK.sum() == 4
        counts += plan.keep_TK[:, 0].float()
    share = counts / 400  # each token kept with probability 4/8
    assert (share - 0.5).abs().max() < 0.1, share
    assert not r.train().is_causal
    plan = r.eval()(x)
    assert plan.keep_TK[:, 0].tolist() == [True] * 4 + [False] * 4
    assert r.eval().is_causal


def test_z_code_m3_preset_values():
    p = impls.PRESETS["z_code_m3"]
    assert p.options == {
        "k": 1,
        "capacity_factor": 1.0,
        "eval_capacity_factor": 1.0,
        "min_capacity": 4,
        "drop_policy": "random",
    }
    r = impls.build_router("z_code_m3", d_model=8, num_experts=4)
    assert r.current_capacity(8) == 4  # max(min_capacity 4, ceil(8 / 4))


# ---------------------------------------------------------------------------------- Chen et al.
def test_chen_2022_router_starts_uniformly_random_with_softmax_weights():
    r = impls.build_router("chen_2022_top1", d_model=6, num_experts=4).train()
    assert (r.gate.weight == 0).all()
    torch.manual_seed(0)
    plan = r(torch.randn(8000, 6))
    counts = torch.bincount(plan.expert_ids_TK[:, 0], minlength=4).float() / 8000
    assert (counts - 0.25).abs().max() < 0.02  # h = 0: the U[0,1] noise alone decides
    torch.testing.assert_close(plan.weights_TK, torch.full_like(plan.weights_TK, 0.25))  # softmax(0)


def test_selection_noise_changes_the_choice_not_the_weight():
    torch.manual_seed(2)
    r = SwitchRouter(6, 4, selection_noise=1.0).train()
    x = torch.randn(500, 6)
    plan = r(x)
    probs = torch.softmax(x @ r.gate.weight.T, -1)
    torch.testing.assert_close(plan.weights_TK, probs.gather(1, plan.expert_ids_TK))
    assert (plan.expert_ids_TK[:, 0] != probs.argmax(-1)).any()
    e1, e2 = r.eval()(x), r.eval()(x)
    assert torch.equal(e1.expert_ids_TK, probs.argmax(-1, keepdim=True)) and torch.equal(
        e1.expert_ids_TK, e2.expert_ids_TK
    )
