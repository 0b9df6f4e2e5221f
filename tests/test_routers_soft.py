"""Soft MoE and the expert-merging routers: each paper's defining property on hand-checked cases, and
plain-PyTorch restatements of the papers' pseudo-code (written from the papers) as references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import impls
from impls.routers.expert_merging.lightweight import MoLoRALinear, MoVScaler, SMoLALinear
from impls.routers.token_merging.soft_moe import l2_normalize

# ---------------------------------------------------------------------------------- Soft MoE


def test_soft_moe_weights_by_hand_on_three_tokens_and_two_slots():
    router = impls.build_router("soft_moe", d_model=2, num_experts=2, normalize=False)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # phi_0 = e_0, phi_1 = e_1
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])
    plan = router(x)
    # logits X Phi = [[0, 0], [1, 0], [0, 2]]; dispatch = softmax over tokens (columns)
    z0 = 1 + math.e + 1
    z1 = 1 + 1 + math.e**2
    want_d = torch.tensor([[1 / z0, 1 / z1], [math.e / z0, 1 / z1], [1 / z0, math.e**2 / z1]])
    torch.testing.assert_close(plan.dispatch_BLS[0], want_d)
    # combine = softmax over slots (rows)
    want_c = torch.tensor(
        [
            [0.5, 0.5],
            [math.e / (math.e + 1), 1 / (math.e + 1)],
            [1 / (1 + math.e**2), math.e**2 / (1 + math.e**2)],
        ]
    )
    torch.testing.assert_close(plan.combine_BLS[0], want_c)
    assert plan.losses == {}
    assert not router.is_causal


def test_soft_moe_normalized_logits_are_scale_times_cosine():
    torch.manual_seed(0)  # the gate's init: a short row of phi would magnify the epsilon below
    router = impls.build_router("soft_moe", d_model=3, num_experts=2, slots_per_expert=2)
    with torch.no_grad():
        router.scale.fill_(4.0)
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    got = router.slot_logits(x)
    phi = router.gate.weight

    def vmoe_normalize(v):  # v / sqrt(|v|^2 + 1e-6): the official code's form, epsilon inside the root
        return v / torch.sqrt(v.square().sum(-1, keepdim=True) + 1e-6)

    torch.testing.assert_close(got, 4.0 * vmoe_normalize(x) @ vmoe_normalize(phi).T, atol=1e-5, rtol=1e-5)
    cos = F.normalize(x, dim=-1) @ F.normalize(phi, dim=-1).T  # the cosine, up to that epsilon
    torch.testing.assert_close(got, 4.0 * cos, atol=1e-3, rtol=1e-3)


def _soft_moe_reference(layer: impls.MoELayer, x_BMD: torch.Tensor) -> torch.Tensor:
    """Algorithms 1-2 of Puigcerver et al. restated: one sequence at a time, one expert at a time."""
    router, experts = layer.router, layer.experts
    n, p = router.num_experts, router.config.slots_per_expert
    phi = router.gate.weight.T.reshape(-1, n, p)  # [d, n, p]
    outs = []
    for X in x_BMD:
        logits = torch.einsum("md,dnp->mnp", l2_normalize(X), router.scale * l2_normalize(phi, dim=0))
        D = logits.softmax(dim=0)
        C = logits.reshape(len(X), -1).softmax(dim=-1).reshape(logits.shape)
        Xs = torch.einsum("md,mnp->npd", X, D)
        Ys = torch.stack([experts.expert_forward(i, Xs[i]) for i in range(n)])
        outs.append(torch.einsum("npd,mnp->md", Ys, C))
    return torch.stack(outs)


@pytest.mark.parametrize("slots", [1, 3])
def test_soft_moe_layer_matches_the_papers_algorithm(slots):
    torch.manual_seed(0)
    layer = impls.MoELayer(8, 16, num_experts=4, router="soft_moe", slots_per_expert=slots)
    x = torch.randn(3, 7, 8)
    out, _ = layer(x)
    torch.testing.assert_close(out, _soft_moe_reference(layer, x), atol=1e-5, rtol=1e-5)


def test_soft_moe_is_permutation_equivariant_in_the_tokens():
    torch.manual_seed(1)
    layer = impls.MoELayer(8, 16, num_experts=4, router="soft_moe", slots_per_expert=2)
    x = torch.randn(2, 9, 8)
    perm = torch.randperm(9)
    out = layer(x)[0]
    torch.testing.assert_close(layer(x[:, perm])[0], out[:, perm], atol=1e-6, rtol=1e-5)


def test_soft_moe_sequences_do_not_mix():
    torch.manual_seed(2)
    layer = impls.MoELayer(8, 16, num_experts=4, router="soft_moe")
    x = torch.randn(2, 6, 8)
    out = layer(x)[0]
    y = x.clone()
    y[1] = torch.randn(6, 8)
    assert torch.equal(layer(y)[0][0], out[0])


# ---------------------------------------------------------------------------------- SMEAR


def _layer(router: str, **options) -> impls.MoELayer:
    torch.manual_seed(0)
    return impls.MoELayer(6, 10, num_experts=3, router=router, **options)


def _plan(weights_BE: torch.Tensor, L: int) -> impls.MergePlan:
    w = weights_BE[:, None]
    return impls.MergePlan(w, w, w.log(), group_length=L, seq_len=L)


def test_smear_with_one_hot_routing_runs_that_single_expert():
    layer = _layer("smear")
    x = torch.randn(2, 5, 6)
    out = layer.mix_sequences(x, _plan(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), 5))
    torch.testing.assert_close(out[0], layer.experts.expert_forward(1, x[0]))
    torch.testing.assert_close(out[1], layer.experts.expert_forward(2, x[1]))


def test_smear_with_uniform_routing_runs_the_averaged_parameter_expert():
    layer = _layer("smear")
    x = torch.randn(2, 5, 6)
    out = layer.mix_sequences(x, _plan(torch.full((2, 3), 1 / 3), 5))
    avg = impls.GroupedExperts(1, 6, 10)
    with torch.no_grad():
        avg.w_in_EDF.copy_(layer.experts.w_in_EDF.mean(0, keepdim=True))
        avg.w_out_EFD.copy_(layer.experts.w_out_EFD.mean(0, keepdim=True))
    torch.testing.assert_close(out, avg.expert_forward(0, x), atol=1e-6, rtol=1e-5)


def test_smear_routes_each_example_on_its_layer_normed_average_and_trains_every_expert():
    layer = _layer("smear")
    router = layer.router
    x = torch.randn(2, 5, 6)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    out, plan = layer(x, mask)
    pooled = torch.stack([x[0].mean(0), x[1, :3].mean(0)])
    want = (F.layer_norm(pooled, (6,), router.norm.weight, router.norm.bias) @ router.gate.weight.T).softmax(
        -1
    )
    torch.testing.assert_close(plan.weights_BGE[:, 0], want)
    out.sum().backward()
    per_expert = layer.experts.w_in_EDF.grad.abs().sum((1, 2))
    assert (per_expert > 0).all(), "every expert gets a gradient through the merge"
    assert router.gate.weight.grad.abs().sum() > 0


def test_smear_expert_dropout_renormalizes_in_training_only():
    router = impls.build_router("smear", d_model=6, num_experts=4, expert_dropout=0.5)
    x = torch.randn(64, 5, 6)
    torch.manual_seed(0)
    w = router.train()(x).weights_BGE[:, 0]
    torch.testing.assert_close(w.sum(-1), torch.ones(64))
    assert (w == 0).any()
    assert (router.eval()(x).weights_BGE > 0).all()


# ---------------------------------------------------------------------------------- MEO


def test_meo_merges_exactly_k_experts_with_the_noisy_top_k_weights_of_the_sequence_average():
    layer = _layer("meo", k=2)
    router = layer.router.eval()
    with torch.no_grad():
        router.pooled_gate.gate.weight.normal_()
    x = torch.randn(4, 5, 6)
    out, plan = layer.eval()(x)
    assert ((plan.weights_BGE > 0).sum(-1) == 2).all()
    ref = router.pooled_gate(x.mean(1))
    torch.testing.assert_close(plan.weights_BGE[:, 0].gather(1, ref.expert_ids_TK), ref.weights_TK)
    assert set(plan.losses) == {"importance", "load"}
    w = plan.weights_BGE[:, 0]
    merged_in = torch.einsum("be,edf->bdf", w, layer.experts.w_in_EDF)
    merged_out = torch.einsum("be,efd->bfd", w, layer.experts.w_out_EFD)
    want = torch.bmm(F.gelu(torch.bmm(x, merged_in)), merged_out)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------- Lory


def _lory_reference(router, x_BLD: torch.Tensor) -> torch.Tensor:
    """Appendix A of Zhong et al. restated: per-segment means, softmax, shift by one segment, the
    first segment's own weights (detached) put back."""
    B, L, D = x_BLD.shape
    T = router.config.segment_length
    segs = x_BLD.view(B, L // T, T, D)
    e = (segs.mean(2) @ router.gate.weight.T).softmax(-1)  # [B, N, E]
    first = e[:, :1].detach()
    return torch.cat([first, e[:, :-1]], 1)


def test_lory_weights_match_the_papers_pseudo_code():
    torch.manual_seed(0)
    router = impls.build_router("lory", d_model=6, num_experts=4, segment_length=4)
    x = torch.randn(2, 16, 6)
    torch.testing.assert_close(router(x).weights_BGE, _lory_reference(router, x))


def test_lory_segment_routing_depends_only_on_earlier_segments():
    torch.manual_seed(0)
    layer = impls.MoELayer(6, 10, num_experts=4, router="lory", segment_length=4)
    x = torch.randn(2, 16, 6)
    out, plan = layer(x)
    for j in (1, 2, 3):  # change segment j: segments before it are bit-identical
        y = x.clone()
        y[:, 4 * j : 4 * j + 4] = torch.randn(2, 4, 6)
        out2, plan2 = layer(y)
        assert torch.equal(out2[:, : 4 * j], out[:, : 4 * j])
        assert torch.equal(plan2.weights_BGE[:, : j + 1], plan.weights_BGE[:, : j + 1])
        if j < 3:
            assert not torch.equal(plan2.weights_BGE[:, j + 1], plan.weights_BGE[:, j + 1])


def test_lory_first_segment_uses_its_own_average_behind_a_stop_gradient():
    torch.manual_seed(0)
    router = impls.build_router("lory", d_model=6, num_experts=4, segment_length=4)
    x = torch.randn(1, 8, 6)
    plan = router(x)
    own = (x[:, :4].mean(1) @ router.gate.weight.T).softmax(-1)
    torch.testing.assert_close(plan.weights_BGE[:, 0], own)
    (plan.weights_BGE[:, 0] * torch.randn(1, 4)).sum().backward()  # the stop-gradient
    assert float(router.gate.weight.grad.abs().sum()) == 0.0
    (router(x).weights_BGE[:, 1] * torch.randn(1, 4)).sum().backward()  # later segments train it
    assert float(router.gate.weight.grad.abs().sum()) > 0
    uniform = impls.build_router("lory", d_model=6, num_experts=4, segment_length=4, first_segment="uniform")
    assert uniform.is_causal and not router.is_causal
    torch.testing.assert_close(uniform(x).weights_BGE[:, 0], torch.full((1, 4), 0.25))


def test_lory_prompt_routing_makes_one_decision_from_the_whole_prompt():
    torch.manual_seed(0)
    router = impls.build_router("lory", d_model=6, num_experts=4, segment_length=4, eval_routing="prompt")
    x = torch.randn(2, 10, 6)
    plan = router.eval()(x)
    assert plan.num_groups == 1 and plan.group_length == 10
    torch.testing.assert_close(plan.weights_BGE[:, 0], (x.mean(1) @ router.gate.weight.T).softmax(-1))
    assert router.train()(x).num_groups == 3  # training keeps segments (the last one short)


# ---------------------------------------------------------------------------------- MoV / MoLoRA / SMoLA


def test_mov_scales_by_the_softmax_merged_vector():
    mov = MoVScaler(width=3, num_experts=2)
    with torch.no_grad():
        mov.vectors_EW.copy_(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))
        mov.router.gate.weight.zero_()  # uniform weights: the merged vector is [2, 2, 2]
    h = torch.randn(2, 4, 3)
    out, _ = mov(h)
    torch.testing.assert_close(out, 2 * h)
    with torch.no_grad():
        mov.router.gate.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    h = torch.tensor([[[math.log(3.0), 1.0, 1.0]]])  # s = softmax([log 3, 0]) = [3/4, 1/4]
    out, _ = mov(h)
    merged = 0.75 * torch.tensor([1.0, 2.0, 3.0]) + 0.25 * torch.tensor([3.0, 2.0, 1.0])
    torch.testing.assert_close(out[0, 0], h[0, 0] * merged)


def test_mov_starts_as_the_identity_and_routes_keys_per_head():
    mov = MoVScaler(width=4, num_experts=3)
    k = torch.randn(2, 5, 2, 4)  # [batch, seq, heads, head_dim]
    out, plan = mov(k)
    torch.testing.assert_close(out, k)
    assert plan.weights_BGE.shape == (2 * 2, 5, 3)


def test_molora_equals_the_frozen_layer_plus_the_weighted_sum_of_low_rank_updates():
    torch.manual_seed(0)
    base = torch.nn.Linear(5, 7)
    lora = MoLoRALinear(base, num_experts=3, rank=2, alpha=4.0)
    with torch.no_grad():
        lora.B_EOR.normal_()
    x = torch.randn(2, 4, 5)
    y, plan = lora(x)
    s = plan.token_weights()
    want = base(x) + 2.0 * sum(s[..., e : e + 1] * (x @ lora.A_ERI[e].T @ lora.B_EOR[e].T) for e in range(3))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert not base.weight.requires_grad
    y.sum().backward()
    assert lora.A_ERI.grad is not None and lora.router.gate.weight.grad is not None


def test_mov_top_k_keeps_the_largest_weights_without_renormalizing():
    router = impls.build_router("mov", d_model=4, num_experts=4, k=2)
    x = torch.randn(1, 6, 4)
    plan = router(x)
    probs = plan.scores_BGE
    top = probs.topk(2, dim=-1)
    torch.testing.assert_close(plan.weights_BGE.gather(-1, top.indices), top.values)
    assert ((plan.weights_BGE > 0).sum(-1) == 2).all() and (plan.weights_BGE.sum(-1) < 1).all()


def test_smola_starts_at_the_frozen_layer_and_keeps_modality_experts_on_their_tokens():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 6)
    smola = SMoLALinear(base, num_experts=3, rank=2, modalities=2)
    x = torch.randn(2, 5, 6)
    ids = torch.tensor([[0, 0, 1, 1, 1], [1, 0, 1, 0, 1]])
    y, plans = smola(x, modality_ids=ids)
    torch.testing.assert_close(y, base(x))  # B = 0: the frozen model
    assert len(plans) == 3
    with torch.no_grad():
        smola.B_SEOR[2].normal_()  # only the experts of modality 1
    y2, plans = smola(x, modality_ids=ids)
    assert torch.equal(y2[ids == 0], y[ids == 0])  # modality-0 tokens never reach them
    assert not torch.allclose(y2[ids == 1], y[ids == 1])
    assert (plans[2].dispatch_BLS[ids == 0] == 0).all()
    with pytest.raises(ValueError, match="modality_ids must be in"):
        smola(x, modality_ids=torch.full((2, 5), 2))
    with pytest.raises(TypeError, match="modality_ids is required"):
        smola(x)
