"""Stateless routing math shared by the routers: capacity, auxiliary losses, masked reductions.

Shape suffixes follow the legend in ``impls.plan``. Everything here is vectorized (no loop over
tokens or experts) and free of host synchronization.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

DropPolicy = Literal["position", "probability"]


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or unchanged when it is already float32 or float64 (never downcast)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def topk(x: torch.Tensor, k: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` along ``dim`` with ties broken towards the lower index, the same on every device.

    ``torch.topk`` leaves the order of equal values unspecified, and CPU and CUDA kernels resolve
    them differently: a zero-initialized gate (Shazeer et al. 2017) or quantized scores then route
    to different experts on different devices. Here equal scores go to the lower expert index.
    For ``k = 1`` this is ``argmax`` (documented to return the first maximum); otherwise the top-k
    runs on an exact ``int64`` key built from the float32 bit pattern (order-preserving) and the
    reversed index, so no two keys tie. Values are gathered from ``x`` and carry its gradient.
    ``-0.0`` ranks just below ``+0.0``.
    """
    dim = dim % x.dim()
    if k == 1:
        ids = x.argmax(dim, keepdim=True)
        return x.gather(dim, ids), ids
    bits = x.detach().float().contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    n = x.shape[dim]
    rev_shape = [1] * x.dim()
    rev_shape[dim] = n
    rev = torch.arange(n - 1, -1, -1, device=x.device).view(rev_shape)
    ids = (ordered * n + rev).topk(k, dim=dim).indices
    return x.gather(dim, ids), ids


def masked_mean(x: torch.Tensor, token_mask_T: torch.Tensor | None, dim: int = 0) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` (the token axis) counting only valid tokens."""
    if token_mask_T is None:
        return x.mean(dim)
    m = token_mask_T.to(x.dtype)
    shape = [1] * x.dim()
    shape[dim] = -1
    return (x * m.view(shape)).sum(dim) / m.sum().clamp_min(1)


def expert_capacity(
    num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int = 0
) -> int:
    """Tokens each expert may take: ``max(min_capacity, ceil(capacity_factor * T * k / E))``, at most ``T``.

    This is the GShard / DeepSpeed convention (``C = ceil(CF * k * T / E)``); for ``k = 1`` it is
    Switch's ``C = CF * T / E``. Computed from shapes only, so it needs no host sync.
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    cap = math.ceil(capacity_factor * num_tokens * k / num_experts)
    return max(1, min(num_tokens, max(min_capacity, cap)))


def capacity_keep(
    expert_ids_TK: torch.Tensor,
    num_experts: int,
    capacity: int,
    *,
    policy: DropPolicy = "position",
    priority_TK: torch.Tensor | None = None,
    token_mask_T: torch.Tensor | None = None,
    group_size: int | None = None,
) -> torch.Tensor:
    """Which routed slots fit in their expert's capacity.

    Slots are served choice by choice: every token's first choice before any second choice
    (GShard, flaxformer). Within one choice, ``policy="position"`` serves tokens in sequence order
    (earlier tokens win; positional by construction, never by ``topk`` tie-breaking), and
    ``policy="probability"`` serves higher ``priority_TK`` first (V-MoE's batch-prioritized routing
    when the priority is the token's top score). Padding tokens and empty slots (``-1``) never
    consume capacity.

    ``group_size`` splits the ``T`` tokens into consecutive groups of that many tokens (one per
    sequence, or Mesh-TensorFlow's / GShard's ``group_size``), each with its own ``capacity`` per
    expert: every group is served independently, in the same single vectorized pass (the
    expert bucket becomes ``(group, expert)``). ``None`` = the whole batch is one group.

    Returns ``bool [T, K]``: True where the assignment is kept.
    """
    T, K = expert_ids_TK.shape
    device = expert_ids_TK.device
    if group_size is not None:
        if group_size <= 0 or T % group_size:
            raise ValueError(f"capacity_keep: group_size={group_size} does not divide the {T} tokens")
        if group_size < T:
            G = T // group_size
            group_TK = (torch.arange(T, device=device) // group_size)[:, None].expand(T, K)
            # bucket (group, expert); invalid slots keep -1 and land in the sentinel bucket
            ids = torch.where(expert_ids_TK >= 0, group_TK * num_experts + expert_ids_TK, -1)
            return capacity_keep(
                ids,
                G * num_experts,
                capacity,
                policy=policy,
                priority_TK=priority_TK,
                token_mask_T=token_mask_T,
            )
    valid_TK = expert_ids_TK >= 0
    if token_mask_T is not None:
        valid_TK = valid_TK & token_mask_T[:, None]
    if policy == "position":
        rank_TK = torch.arange(T, device=device)[:, None].expand(T, K)
    elif policy == "probability":
        if priority_TK is None:
            raise ValueError("policy='probability' needs priority_TK")
        # rank of each token within its choice column, highest priority first
        order_TK = torch.argsort(priority_TK.float(), dim=0, descending=True, stable=True)
        rank_TK = torch.empty_like(order_TK)
        rank_TK.scatter_(0, order_TK, torch.arange(T, device=device)[:, None].expand(T, K))
    else:
        raise ValueError(f"unknown drop policy {policy!r}; use 'position' or 'probability'")
    # global serving order: choice j first, then rank within the choice
    key = (torch.arange(K, device=device)[None, :] * T + rank_TK).reshape(-1)
    expert = torch.where(valid_TK, expert_ids_TK, num_experts).reshape(-1)  # invalid -> sentinel bucket
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(expert[order], stable=True)]  # group by expert, keep serving order
    expert_sorted = expert[order]
    counts = torch.bincount(expert_sorted, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    pos_sorted = torch.arange(T * K, device=device) - starts[expert_sorted]
    keep_sorted = (pos_sorted < capacity) & (expert_sorted < num_experts)
    keep = torch.empty_like(keep_sorted)
    keep[order] = keep_sorted
    return keep.view(T, K)


def assignment_fraction(
    expert_ids_TK: torch.Tensor, num_experts: int, token_mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """``f_E``: fraction of routed (token, slot) assignments that chose each expert, pre-capacity.

    Sums to 1 over experts. Padding and empty slots are excluded.
    """
    valid_TK = expert_ids_TK >= 0
    if token_mask_T is not None:
        valid_TK = valid_TK & token_mask_T[:, None]
    counts = torch.zeros(num_experts, device=expert_ids_TK.device, dtype=torch.float32)
    counts.scatter_add_(0, expert_ids_TK.clamp_min(0).reshape(-1), valid_TK.reshape(-1).float())
    return counts / counts.sum().clamp_min(1)


def load_balance_loss(
    probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, token_mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``E * sum_i f_i * P_i`` (Fedus et al. 2021, eq. 4).

    ``f_i`` is the fraction of assignments routed to expert ``i`` (taken from the router's own
    top-k decision, *before* capacity), ``P_i`` the mean router probability of ``i`` over valid
    tokens. Convention: a perfectly balanced router gives exactly ``1.0`` for any ``k`` (GShard,
    Megatron, DeepSpeed and flaxformer agree; HF's Mixtral family reports ``k`` times this).
    """
    E = probs_TE.shape[-1]
    f_E = assignment_fraction(expert_ids_TK, E, token_mask_T)
    P_E = masked_mean(at_least_float32(probs_TE), token_mask_T)
    return E * (f_E * P_E).sum()


def z_loss(logits_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss ``mean_t logsumexp(h_t)^2`` (ST-MoE, Zoph et al. 2022, eq. 5), valid tokens only."""
    return masked_mean(torch.logsumexp(at_least_float32(logits_TE), dim=-1) ** 2, token_mask_T)


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``Var(x) / Mean(x)^2`` (Shazeer et al. 2017, eq. 6-7)."""
    x = at_least_float32(x)
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var(unbiased=False) / (x.mean() ** 2 + 1e-10)


def expert_counts(
    expert_ids_TK: torch.Tensor, num_experts: int, token_mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """``float32 [E]``: routed (token, slot) assignments per expert, pre-capacity, padding excluded."""
    valid_TK = expert_ids_TK >= 0
    if token_mask_T is not None:
        valid_TK = valid_TK & token_mask_T[:, None]
    counts = torch.zeros(num_experts, device=expert_ids_TK.device, dtype=torch.float32)
    return counts.scatter_add_(0, expert_ids_TK.clamp_min(0).reshape(-1), valid_TK.reshape(-1).float())


def load_balance_loss_from_counts(
    probs_TE: torch.Tensor, counts_E: torch.Tensor, token_mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """``E * sum_i f_i * P_i`` with ``f_i`` taken from given assignment counts.

    The counts may come from more tokens than ``probs_TE`` (all data-parallel ranks, all
    micro-batches of a step): that is the *global-batch* balance loss, whose ``f`` is shared while
    ``P`` stays local, so the token-weighted mean of the per-shard losses equals the loss of the
    whole batch. Balanced counts and probabilities give ``1.0``.
    """
    E = probs_TE.shape[-1]
    counts_E = counts_E.detach().float()
    f_E = counts_E / counts_E.sum().clamp_min(1)
    P_E = masked_mean(at_least_float32(probs_TE), token_mask_T)
    return E * (f_E * P_E).sum()


def sequence_load_balance_loss(
    probs_TE: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    sequence_length: int,
    token_mask_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sequence-wise balance loss: ``E * sum_i f_i P_i`` per sequence, averaged over sequences.

    DeepSeek-V3 (eq. 17-20) computes ``f`` and ``P`` over the tokens of one sequence so that no
    single sequence is extremely unbalanced. ``probs_TE`` should already be normalized per token
    (V3 divides its sigmoid affinities by their sum). Padding is excluded; sequences with no valid
    token do not count. Tokens are ``[batch * seq]`` token-major, ``seq = sequence_length``.
    """
    T, E = probs_TE.shape
    if sequence_length <= 0 or T % sequence_length:
        raise ValueError(f"sequence_length={sequence_length} does not divide {T} tokens")
    B = T // sequence_length
    K = expert_ids_TK.shape[1]
    valid_TK = expert_ids_TK >= 0
    valid_T = (
        torch.ones(T, dtype=torch.bool, device=probs_TE.device) if token_mask_T is None else token_mask_T
    )
    valid_TK = valid_TK & valid_T[:, None]
    seq_of_TK = (torch.arange(T, device=probs_TE.device) // sequence_length)[:, None].expand(T, K)
    flat = (seq_of_TK * E + expert_ids_TK.clamp_min(0)).reshape(-1)
    counts_BE = torch.zeros(B * E, device=probs_TE.device, dtype=torch.float32)
    counts_BE = counts_BE.scatter_add_(0, flat, valid_TK.reshape(-1).float()).view(B, E)
    f_BE = counts_BE / counts_BE.sum(-1, keepdim=True).clamp_min(1)
    m_BS1 = valid_T.view(B, sequence_length, 1).float()
    n_B = m_BS1.sum((1, 2))
    P_BE = (at_least_float32(probs_TE).view(B, sequence_length, E) * m_BS1).sum(1) / n_B.clamp_min(1)[:, None]
    per_seq = E * (f_BE * P_BE).sum(-1)
    has = (n_B > 0).float()
    return (per_seq * has).sum() / has.sum().clamp_min(1)


def entropy(probs_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over valid tokens of the entropy ``-sum_e p log p`` of each token's distribution."""
    p = at_least_float32(probs_TE)
    h_T = -(p * torch.log(p.clamp_min(1e-20))).sum(-1)
    return masked_mean(h_T, token_mask_T)
