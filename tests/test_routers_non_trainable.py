"""Non-trainable token choice: hash layers, THOR, PanGu-Σ's Random Routed Experts, and the metadata
routers (DEMix, Task-MoE, M2M-100, Uni-Perceiver-MoE), on hand-checked cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import impls
from impls.routers.non_trainable.hash_layers import HashRouter, balanced_table, random_table
from impls.routers.non_trainable.metadata import demix_mixture, demix_posterior, update_prior
from impls.routers.non_trainable.random_routing import thor_consistency_loss

D = 8

# ---------------------------------------------------------------------------------- hash layers


def test_hash_routing_is_a_pure_function_of_the_token_id():
    router = impls.build_router("hash", d_model=D, num_experts=4, vocab_size=20)
    ids = torch.tensor([3, 7, 3, 19, 7, 0])
    a = router(torch.randn(6, D), token_ids=ids)
    b = router(100 * torch.randn(6, D), token_ids=ids)  # other hidden states, same ids
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    assert torch.equal(a.expert_ids_TK[:, 0], router.table_V[ids])
    assert a.expert_ids_TK[0] == a.expert_ids_TK[2] and a.expert_ids_TK[1] == a.expert_ids_TK[4]
    torch.testing.assert_close(a.weights_TK, torch.ones(6, 1))
    assert not list(router.parameters()) and a.losses == {}


def test_the_random_hash_is_seeded_and_covers_the_experts():
    t = random_table(10_000, 8, seed=42)
    assert torch.equal(t, random_table(10_000, 8, seed=42))
    assert not torch.equal(t, random_table(10_000, 8, seed=43))
    counts = torch.bincount(t, minlength=8).float()
    assert (counts - 1250).abs().max() < 5 * math.sqrt(1250)  # 5 sigma of a uniform draw


def test_the_balanced_hash_on_hand_checked_frequency_tables():
    # equal counts: loads within one token of equal
    ones = torch.ones(10)
    router = HashRouter.balanced(ones, d_model=D, num_experts=3)
    loads = router.bucket_loads(ones)
    assert loads.max() - loads.min() <= 1 and loads.sum() == 10
    # [50, 30, 20, 20, 10, 10, 5, 5] over 3 buckets: 50 | 30 + 10 + 10 | 20 + 20 + 5 + 5
    counts = torch.tensor([50, 30, 20, 20, 10, 10, 5, 5])
    assert balanced_table(counts, 3).tolist() == [0, 1, 2, 2, 1, 1, 2, 2]
    assert HashRouter.balanced(counts, d_model=D, num_experts=3).bucket_loads(counts).tolist() == [50, 50, 50]


def test_the_balanced_hash_keeps_loads_within_one_type_of_each_other_on_zipf_counts():
    counts = (10_000 / torch.arange(1, 2001)).round()
    router = HashRouter.balanced(counts, d_model=D, num_experts=16)
    loads = router.bucket_loads(counts)
    # a single type of count 10000 exceeds 1/16 of the data: it alone fills one bucket
    big = counts > counts.sum() / 16
    rest = loads[router.table_V[~big].unique()]
    assert rest.max() - rest.min() <= counts[~big].max()
    random = impls.build_router("hash", d_model=D, num_experts=16, vocab_size=2000).bucket_loads(counts)
    assert rest.max() / rest.mean() < random.max() / random.mean()


def test_clustered_and_dispersed_hashes_from_token_embeddings():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]])
    labels = torch.arange(30) % 3
    emb = centres[labels] + 0.1 * torch.randn(30, 2, generator=g)
    clustered = HashRouter.clustered(emb, d_model=D, num_experts=3)
    for c in range(3):  # one expert per cluster
        assert clustered.table_V[labels == c].unique().numel() == 1
    assert clustered.table_V.unique().numel() == 3
    dispersed = HashRouter.clustered(emb, d_model=D, num_experts=3, dispersed=True)
    for c in range(3):  # each cluster spread evenly over all experts
        assert torch.bincount(dispersed.table_V[labels == c], minlength=3).tolist() == [4, 3, 3] or sorted(
            torch.bincount(dispersed.table_V[labels == c], minlength=3).tolist()
        ) == [3, 3, 4]


def test_hash_inputs_are_validated_with_errors_naming_them():
    router = impls.build_router("hash", d_model=D, num_experts=4, vocab_size=20)
    x = torch.randn(2, 3, D)
    with pytest.raises(TypeError, match=r"missing routing input.*token_ids"):
        router(x)
    with pytest.raises(TypeError, match="token_ids must hold integer ids"):
        router(x, token_ids=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"token_ids must have shape \[2, 3\]"):
        router(x, token_ids=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_ids must be in \[0, 20\), got 20"):
        router(x, token_ids=torch.full((2, 3), 20))
    with pytest.raises(TypeError, match="unexpected routing input"):
        router(x, token_ids=torch.zeros(2, 3, dtype=torch.long), domain_ids=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        impls.build_router("hash", d_model=D, num_experts=4)
    with pytest.raises(ValueError, match=r"HashRouter\.balanced"):
        impls.build_router("hash", d_model=D, num_experts=4, vocab_size=5, hash="balanced")


def test_a_hash_layer_runs_in_the_moe_layer_with_batch_seq_token_ids():
    layer = impls.MoELayer(D, 16, num_experts=4, router="hash", vocab_size=20)
    x = torch.randn(2, 5, D)
    ids = torch.randint(0, 20, (2, 5))
    out, _ = layer(x, token_ids=ids)
    table = layer.router.table_V
    for b in range(2):
        for t in range(5):
            want = layer.experts.expert_forward(int(table[ids[b, t]]), x[b, t : t + 1])
            torch.testing.assert_close(out[b, t : t + 1], want, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------- THOR


def test_thor_sends_the_whole_batch_to_one_random_expert_and_redraws_every_pass():
    router = impls.build_router("thor", d_model=D, num_experts=4).train()
    x = torch.randn(10, D)
    torch.manual_seed(5)
    draws = []
    for _ in range(40):
        plan = router(x)
        assert plan.expert_ids_TK.unique().numel() == 1  # one expert for every token
        draws.append(int(plan.expert_ids_TK[0, 0]))
    torch.manual_seed(5)
    assert draws == [int(torch.randint(0, 4, (1,))) for _ in range(40)]  # a uniform draw per pass
    assert set(draws) == {0, 1, 2, 3}
    assert not list(router.parameters())


def test_thor_evaluation_draws_per_token_or_per_sequence_and_is_deterministic():
    router = impls.build_router("thor", d_model=D, num_experts=4).eval()
    x = torch.randn(3, 6, D)
    a, b = router(x), router(x)
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    assert a.expert_ids_TK.unique().numel() > 1
    seq = impls.build_router("thor", d_model=D, num_experts=4, eval_routing="sequence").eval()
    ids = seq(x).expert_ids_TK.view(3, 6)
    assert (ids == ids[:, :1]).all()


def test_thor_consistency_loss_is_the_symmetric_kl_by_hand():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    kl_pq = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl_qp = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    got = thor_consistency_loss(p.log()[None], q.log()[None])
    torch.testing.assert_close(got, torch.tensor(0.5 * (kl_pq + kl_qp)))
    logits = torch.randn(4, 7)
    assert float(thor_consistency_loss(logits, logits)) == pytest.approx(0.0, abs=1e-7)
    a, b = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    full = thor_consistency_loss(a, b, reduction="sum")
    part = thor_consistency_loss(a, b, mask, reduction="mean")
    per = 0.5 * (
        F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1)
        + F.kl_div(F.log_softmax(a, -1), F.log_softmax(b, -1), log_target=True, reduction="none").sum(-1)
    )
    torch.testing.assert_close(full, per.sum())
    torch.testing.assert_close(part, per[mask].mean())


# ---------------------------------------------------------------------------------- PanGu-Σ RRE


def test_random_routed_experts_never_leave_the_tokens_domain_group():
    router = impls.build_router(
        "random_routed_experts", d_model=D, num_experts=12, vocab_size=50, num_domains=3
    )
    ids = torch.randint(0, 50, (300,))
    dom = torch.randint(0, 3, (300,))
    e = router(torch.randn(300, D), token_ids=ids, domain_ids=dom).expert_ids_TK[:, 0]
    assert ((e // 4) == dom).all()  # domain d owns experts 4d .. 4d + 3
    same = router(torch.randn(300, D), token_ids=ids, domain_ids=dom).expert_ids_TK[:, 0]
    assert torch.equal(e, same)  # a fixed map: same (domain, token id), same expert
    for d in range(3):
        assert router.table_NV[d].unique().numel() == 4  # the random map uses the whole group
    with pytest.raises(ValueError, match="num_domains must divide"):
        impls.build_router("random_routed_experts", d_model=D, num_experts=10, vocab_size=5, num_domains=3)
    with pytest.raises(ValueError, match=r"domain_ids must be in \[0, 3\)"):
        router(torch.randn(2, D), token_ids=torch.zeros(2, dtype=torch.long), domain_ids=torch.tensor([0, 3]))


# ---------------------------------------------------------------------------------- metadata


def test_a_domain_router_never_sends_a_token_outside_its_domains_expert():
    router = impls.build_router("demix", d_model=D)
    x = torch.randn(4, 6, D)
    dom = torch.tensor([0, 7, 3, 3])  # one domain per sequence
    plan = router(x, label_ids=dom)
    assert torch.equal(plan.expert_ids_TK[:, 0].view(4, 6), dom[:, None].expand(4, 6))
    per_token = torch.randint(0, 8, (4, 6))
    assert torch.equal(router(x, label_ids=per_token).expert_ids_TK[:, 0], per_token.reshape(-1))


def test_language_groups_and_random_rerouting():
    router = impls.build_router(
        "m2m_100", d_model=D, num_experts=3, num_labels=6, label_to_expert=(0, 0, 1, 1, 2, 2)
    )
    langs = torch.tensor([0, 1, 2, 3, 4, 5])
    assert router(torch.randn(6, D), label_ids=langs).expert_ids_TK[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    rr = impls.build_router("label", d_model=D, num_experts=3, reroute_prob=0.5).train()
    torch.manual_seed(0)
    lab = torch.randint(0, 3, (400,))
    got = rr(torch.randn(400, 5, D), label_ids=lab).expert_ids_TK[:, 0].view(400, 5)
    moved = got[:, 0] != lab
    assert (got == got[:, :1]).all()  # a whole sequence moves, or none of it
    assert 0.4 < moved.float().mean() < 0.6  # about reroute_prob of the sequences
    assert torch.equal(
        rr.eval()(torch.randn(400, 5, D), label_ids=lab).expert_ids_TK[:, 0].view(400, 5)[:, 0], lab
    )
    with pytest.raises(ValueError, match="give label_to_expert"):
        impls.build_router("label", d_model=D, num_experts=3, num_labels=6)


def test_demix_posterior_and_prior_by_hand():
    # two domains, one sequence of three tokens: log p(x_t | D=j)
    lp = torch.log(torch.tensor([[[0.5, 0.2, 0.9]], [[0.1, 0.4, 0.3]]]))
    w = demix_posterior(lp)
    torch.testing.assert_close(w[:, 0, 0], torch.tensor([0.5, 0.5]))  # nothing seen: the prior
    torch.testing.assert_close(w[:, 0, 1], torch.tensor([0.5 / 0.6, 0.1 / 0.6]))
    torch.testing.assert_close(w[:, 0, 2], torch.tensor([0.1 / 0.14, 0.04 / 0.14]))  # the prefix product
    prev = demix_posterior(lp, history="previous")
    torch.testing.assert_close(prev[:, 0, 2], torch.tensor([0.2 / 0.6, 0.4 / 0.6]))  # last token only
    skewed = demix_posterior(lp, prior_J=torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(skewed[:, 0, 1], torch.tensor([0.125 / 0.2, 0.075 / 0.2]))
    prior = update_prior(torch.tensor([0.5, 0.5]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(prior, torch.tensor([0.3 * 2 / 3 + 0.35, 0.3 / 3 + 0.35]))
    probs = torch.softmax(torch.randn(2, 1, 3, 5), -1)
    mixed = demix_mixture(probs, w)
    torch.testing.assert_close(mixed, w[0, ..., None] * probs[0] + w[1, ..., None] * probs[1])
    torch.testing.assert_close(mixed.sum(-1), torch.ones(1, 3))


def test_task_routing_depends_only_on_the_task():
    router = impls.build_router("task_moe", d_model=D, num_experts=8, num_tasks=3)
    tasks = torch.tensor([0, 1, 2, 0, 1, 2])
    a = router(torch.randn(6, D), task_ids=tasks)
    b = router(50 * torch.randn(6, D), task_ids=tasks)
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK) and torch.equal(a.weights_TK, b.weights_TK)
    for t in range(3):
        rows = a.expert_ids_TK[tasks == t]
        assert (rows == rows[:1]).all()  # one task, one pair of experts
    emb = router.task_embedding.weight
    want = (emb[tasks] @ router.gate.weight.T).softmax(-1).topk(2)
    torch.testing.assert_close(a.weights_TK, want.values / want.values.sum(-1, keepdim=True))
    (a.weights_TK * torch.randn(6, 2)).sum().backward()
    assert emb.grad.abs().sum() > 0


def test_sentence_routing_gates_on_the_sentence_average():
    router = impls.build_router("sentence_moe", d_model=D, num_experts=8)
    x = torch.randn(3, 5, D)
    plan = router(x)
    ids = plan.expert_ids_TK.view(3, 5, 2)
    assert (ids == ids[:, :1]).all()
    want = (x.mean(1) @ router.gate.weight.T).softmax(-1).topk(2)
    torch.testing.assert_close(
        plan.weights_TK.view(3, 5, 2)[:, 0], want.values / want.values.sum(-1, keepdim=True)
    )


def test_attribute_routing_depends_only_on_the_token_attribute():
    router = impls.build_router("uni_perceiver_moe", d_model=D).eval()
    attr = torch.tensor([0, 1, 2, 3, 0, 3])
    a = router(torch.randn(6, D), attribute_ids=attr)
    b = router(torch.randn(6, D), attribute_ids=attr)
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    assert torch.equal(a.expert_ids_TK[0], a.expert_ids_TK[4]) and torch.equal(
        a.expert_ids_TK[3], a.expert_ids_TK[5]
    )
    torch.testing.assert_close(a.weights_TK.sum(-1), torch.ones(6))
    assert router.attributes_AN.shape == (6, 8)
