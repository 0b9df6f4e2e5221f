"""LatentMoE: routing reads the model-width input while the experts run in the latent space; with
identity projections (latent = model width) the layer equals the ordinary MoE layer."""

from __future__ import annotations

import pytest
import torch

import impls
from impls.routers.token_choice.latent_moe import NEMOTRON_3_SUPER, LatentMoELayer


def test_equals_a_restatement_with_a_loop_over_slots():
    torch.manual_seed(0)
    layer = LatentMoELayer(12, 4, 8, num_experts=6, router="topk", k=2, num_shared_experts=1)
    x = torch.randn(9, 12)
    y, plan = layer(x)
    u = x @ layer.down.weight.T
    ref = torch.zeros(9, 4)
    for t in range(9):
        for e, w in zip(plan.expert_ids_TK[t].tolist(), plan.weights_TK[t], strict=True):
            ref[t] += w * layer.experts.expert_forward(e, u[t : t + 1])[0]
    ref = ref @ layer.up.weight.T + layer.shared(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    # the router saw the model-width input
    torch.testing.assert_close(plan.logits_TE, x @ layer.router.gate.weight.T)


def test_identity_projections_give_the_plain_layer():
    torch.manual_seed(0)
    latent = LatentMoELayer(8, 8, 16, num_experts=4, router="topk", k=2)
    plain = impls.MoELayer(8, 16, num_experts=4, router="topk", k=2, activation="swiglu")
    with torch.no_grad():
        latent.down.weight.copy_(torch.eye(8))
        latent.up.weight.copy_(torch.eye(8))
        plain.router.gate.weight.copy_(latent.router.gate.weight)
        plain.experts.w_in_EDF.copy_(latent.experts.w_in_EDF)
        plain.experts.w_out_EFD.copy_(latent.experts.w_out_EFD)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(latent(x)[0], plain(x)[0])


def test_preset_and_validation():
    # Megatron-LM Nemotron 3 Super script: 512 experts, top-22, sigmoid, expert bias, scaling 5.0,
    # seq_aux_loss 1e-4 (latent 1024 of hidden 4096)
    o = NEMOTRON_3_SUPER.options
    assert NEMOTRON_3_SUPER.num_experts == 512 and o["k"] == 22 and o["routed_scaling_factor"] == 5.0
    assert o["score_func"] == "sigmoid" and o["aux_free_bias"]
    assert NEMOTRON_3_SUPER.loss_coefficients == {"seq_load_balance": 1e-4}
    layer = LatentMoELayer(64, 16, 8, router="nemotron_3_super")
    assert layer.experts.num_experts == 512 and layer.experts.d_model == 16
    with pytest.raises(ValueError, match="latent_dim"):
        LatentMoELayer(8, 16, 8, num_experts=4)
