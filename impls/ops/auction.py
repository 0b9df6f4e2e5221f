r"""Exact balanced linear assignment of tokens to experts: auction algorithm plus optimality repair.

Problem (BASE layers, Lewis et al. 2021): given affinities ``a_TE`` and capacities ``c_E`` with
``sum(c) = T``, choose one expert per token so that expert ``e`` gets exactly ``c_e`` tokens and
``sum_t a[t, e(t)]`` is maximal. It is a linear assignment problem on the *expanded* matrix in
which expert ``e``'s column is repeated ``c_e`` times (one column per slot, or "copy").

Algorithm, all vectorized in torch (loops only over rounds, never over tokens):

1. **Warm start.** A few log-domain Sinkhorn iterations (``impls.ops.sinkhorn``) give expert
   potentials ``g``; ``price_e = -ε_s g_e`` is an approximate optimal dual price. Every token takes
   its best expert at these prices; an over-full expert keeps the tokens with the largest margin.
2. **Forward auction** (Bertsekas 1988, Jacobi form) on the expanded problem. Each unassigned
   token ``t`` values expert ``e`` at ``a_te - λ1_e`` (``λ1_e``: the cheapest copy's price), finds
   its best expert ``e*`` and the best alternative ``w`` (the second-best expert, or the
   second-cheapest copy ``λ2`` of ``e*``) and bids ``λ1_e* + (v1 - w) + ε``. Expert ``e`` sorts its
   bidders by bid and its copies by price; the ``r``-th highest bidder takes the ``r``-th cheapest
   copy when it outbids that copy's price by at least ε, evicting the old holder. Every winner
   ends within ε of its best option (ε-complementary slackness), so the result is within ``T·ε``
   of the optimum. The loop stops when every token holds a copy; the check is one host sync per
   round, and ``max_rounds`` caps it (the rest is then filled greedily and left to step 3).
3. **Exact repair.** A feasible assignment is optimal iff its residual network has no negative
   cycle. Condensed onto experts, moving one token from ``e`` to ``f`` costs
   ``W_ef = min_{t in e} (a_te - a_tf)``; a cycle ``e1 → e2 → … → e1`` with negative total cost
   moves one (distinct) token along each edge, keeps every expert's count and raises the total
   affinity. Bellman–Ford on the ``E × E`` matrix finds such a cycle; it is applied, and the search
   repeats until none is left (up to ``max_repairs``; one host sync per search). With no negative
   cycle left (beyond a float64 round-off tolerance) the assignment is optimal: ``optimal=True``.

Costs: ``O(T·E)`` per auction round and per repair, ``O(E^3)`` per cycle search; the benefits are
handled in float64 and rescaled to ``[0, 1]`` (the optimal assignment is invariant to that).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from impls.ops.sinkhorn import sinkhorn


@dataclass(frozen=True, eq=False)
class AssignmentResult:
    """Output of ``balanced_assignment()``.

    Attributes:
        expert_T: ``long [T]`` the expert of every token (``-1`` for excluded tokens).
        rounds: auction rounds run.
        repairs: negative cycles cancelled by the exact repair.
        optimal: True when the repair certified optimality (no negative cycle left).
    """

    expert_T: torch.Tensor
    rounds: int
    repairs: int
    optimal: bool


def balanced_capacities(
    num_tokens: int, num_experts: int, device: torch.device | None = None
) -> torch.Tensor:
    """``long [E]`` capacities summing to ``T``: ``T // E`` each, and the first ``T % E`` experts one more."""
    base, extra = divmod(num_tokens, num_experts)
    cap = torch.full((num_experts,), base, dtype=torch.long, device=device)
    cap[:extra] += 1
    return cap


def _group_rank(keys: torch.Tensor, priority: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Rank of each item within its group ``keys`` (0 = highest ``priority``), vectorized."""
    order = torch.argsort(priority, descending=True, stable=True)
    order = order[torch.argsort(keys[order], stable=True)]
    counts = torch.bincount(keys, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(keys)
    rank[order] = torch.arange(keys.numel(), device=keys.device) - starts[keys[order]]
    return rank


def _auction(
    a: torch.Tensor, cap: torch.Tensor, price_E: torch.Tensor, eps: float, max_rounds: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Uniform-price forward auction from expert prices ``price_E``.

    Expert ``e`` has ``cap[e]`` places, each remembering the offer ``beta`` of the token holding it
    (``-inf`` when free). Returns ``expert_T``, the final prices and the rounds run.
    """
    T, E = a.shape
    C = max(int(cap.max()), 1)
    dev, dt = a.device, a.dtype
    ninf = torch.tensor(-float("inf"), dtype=dt, device=dev)
    exists = torch.arange(C, device=dev)[None, :] < cap[:, None]
    place_beta = torch.where(exists, ninf, float("inf"))  # missing places can never be taken
    place_tok = torch.full((E, C), -1, dtype=torch.long, device=dev)
    expert_T = torch.full((T,), -1, dtype=torch.long, device=dev)
    price = price_E.clone()
    rounds = 0
    while rounds < max_rounds:
        idx = (expert_T < 0).nonzero().squeeze(1)  # host sync: the termination check
        if idx.numel() == 0:
            break
        rounds += 1
        top2 = (a[idx] - price).topk(2, dim=1)
        e1, v1, v2 = top2.indices[:, 0], top2.values[:, 0], top2.values[:, 1]
        v2 = torch.where(torch.isfinite(v2), v2, v1 - 4.0)  # no alternative: any finite raise
        # the most the token pays for e1 and stays within eps of its best alternative
        beta = a[idx, e1] - v2 + eps
        # expert e: its r-th best bidder against its r-th weakest place (a merge of two sorted lists)
        rank = _group_rank(e1, beta, E)
        weakest, order = place_beta.sort(dim=1)
        r = rank.clamp_max(C - 1)
        win = (rank < C) & (beta > weakest[e1, r])
        w = win.nonzero().squeeze(1)
        we, slot = e1[w], order[e1[w], r[w]]
        evicted_tok, evicted_beta = place_tok[we, slot], place_beta[we, slot]
        # an over-demanded expert's price rises to the best offer it turned away
        best_loser = torch.full((E,), -float("inf"), dtype=dt, device=dev)
        best_loser.scatter_reduce_(0, e1, torch.where(win, ninf, beta), "amax")
        best_loser.scatter_reduce_(0, we, evicted_beta, "amax")
        price = torch.maximum(price, best_loser)
        expert_T[evicted_tok[evicted_tok >= 0]] = -1
        place_tok[we, slot] = idx[w]
        place_beta[we, slot] = beta[w]
        expert_T[idx[w]] = we
    else:
        # cap reached: fill the free places greedily (feasible); the exact repair finishes the job
        free = (place_tok < 0) & exists
        left = (expert_T < 0).nonzero().squeeze(1)
        expert_T[left] = free.nonzero()[: left.numel(), 0]
    return expert_T, price, rounds


def _move_costs(a: torch.Tensor, expert_T: torch.Tensor, E: int) -> torch.Tensor:
    """``W [E, E]``: cheapest loss of affinity to move one token from expert e to expert f."""
    d = a.gather(1, expert_T[:, None]) - a
    W = torch.full((E, E), float("inf"), dtype=a.dtype, device=a.device)
    return W.scatter_reduce_(0, expert_T[:, None].expand_as(d), d, reduce="amin")


def _negative_cycles(W: torch.Tensor, tol: float) -> list[list[int]]:
    """Vertex-disjoint negative-cost cycles of the complete digraph ``W`` (Bellman–Ford).

    After ``E`` relaxations from a virtual source, every cycle of the predecessor graph has
    negative cost; they are vertex-disjoint because each vertex has one predecessor. An empty
    list means no negative cycle exists.
    """
    E = W.shape[0]
    W = W.clone()
    W.fill_diagonal_(float("inf"))
    dist = torch.zeros(E, dtype=W.dtype, device=W.device)
    pred = torch.full((E,), -1, dtype=torch.long, device=W.device)
    changed = torch.zeros(E, dtype=torch.bool, device=W.device)
    for _ in range(E):
        cand, arg = (dist[:, None] + W).min(0)
        changed = cand < dist - tol
        dist = torch.where(changed, cand, dist)
        pred = torch.where(changed, arg, pred)
    if not bool(changed.any()):  # host sync, once per search
        return []
    pred_l, W_l = pred.tolist(), W.tolist()
    state = [0] * E  # 0 unseen, 1 on the current walk, 2 done
    cycles = []
    for start in range(E):
        walk, v = [], start
        while v >= 0 and state[v] == 0:
            state[v] = 1
            walk.append(v)
            v = pred_l[v]
        if v >= 0 and state[v] == 1:  # closed a new cycle: walk[i:] in predecessor order
            cyc = walk[walk.index(v) :][::-1]  # edges cyc[i] -> cyc[i + 1]
            if sum(W_l[e][f] for e, f in zip(cyc, cyc[1:] + cyc[:1], strict=True)) < -tol:
                cycles.append(cyc)
        for u in walk:
            state[u] = 2
    return cycles


def balanced_assignment(
    scores_TE: torch.Tensor,
    capacities_E: torch.Tensor | None = None,
    *,
    token_mask_T: torch.Tensor | None = None,
    eps: float = 1e-3,
    eps_start: float | None = None,
    eps_factor: float = 8.0,
    max_rounds: int = 10_000,
    max_repairs: int | None = None,
    warm_start_iters: int = 0,
    warm_start_epsilon: float = 0.02,
) -> AssignmentResult:
    """Exact balanced assignment maximizing ``sum_t scores[t, expert(t)]`` (see module docs).

    Args:
        scores_TE: ``[T, E]`` affinities (any float dtype; NaN is an error).
        capacities_E: ``long [E]`` tokens per expert summing to the number of valid tokens;
            default ``balanced_capacities()`` (the first ``T % E`` experts take one more).
        token_mask_T: bool ``[T]``; False tokens are left out (``expert_T = -1``).
        eps: final auction ε on benefits rescaled to ``[0, 1]``; the auction result is within
            ``T·eps`` of optimal before the repair.
        eps_start: first ε of an ε-scaling schedule (divided by ``eps_factor`` per phase down to
            ``eps``; prices carry over between phases); ``None`` = a single phase at ``eps``.
        eps_factor: ε reduction per phase.
        max_rounds: cap on auction rounds (all phases together).
        max_repairs: cap on cancelled cycles (default ``10 * E``); ``optimal=False`` if hit.
        warm_start_iters: Sinkhorn iterations for the initial prices (0 = start from zero prices;
            worthwhile on GPUs, where the iterations are cheap next to host-synced rounds).
        warm_start_epsilon: Sinkhorn ε for the warm start, relative to the benefit range.
    """
    if scores_TE.dim() != 2 or not scores_TE.is_floating_point():
        raise ValueError("balanced_assignment: scores_TE must be a float tensor of shape [T, E]")
    T_all, E = scores_TE.shape
    dev = scores_TE.device
    a_all = scores_TE.detach().to(torch.float64)
    if bool(torch.isnan(a_all).any()):
        raise ValueError("balanced_assignment: scores_TE contains NaN")
    keep = torch.arange(T_all, device=dev) if token_mask_T is None else token_mask_T.nonzero().squeeze(1)
    a = a_all[keep]
    T = a.shape[0]
    cap = balanced_capacities(T, E, dev) if capacities_E is None else capacities_E.to(dev, torch.long)
    if cap.shape != (E,) or int(cap.sum()) != T or bool((cap < 0).any()):
        raise ValueError(f"balanced_assignment: capacities_E must be {E} non-negative ints summing to {T}")
    out = torch.full((T_all,), -1, dtype=torch.long, device=dev)
    if T == 0:
        return AssignmentResult(out, 0, 0, True)
    if E == 1:
        out[keep] = 0
        return AssignmentResult(out, 0, 0, True)
    finite = torch.isfinite(a)
    lo = torch.where(finite, a, float("inf")).amin().clamp_max(0.0)
    hi = torch.where(finite, a, -float("inf")).amax().clamp_min(lo + 1e-300)
    # rescale to [0, 1]; +-inf become strong (finite) preferences outside that range
    a = ((a.clamp(2 * lo - hi - 1, 2 * hi - lo + 1) - lo) / (hi - lo)).nan_to_num()

    price_E = torch.where(cap > 0, 0.0, float("inf")).to(torch.float64)
    if warm_start_iters > 0:
        res = sinkhorn(
            a,
            epsilon=warm_start_epsilon,
            col_marginal=cap.to(torch.float64),
            max_iters=warm_start_iters,
            tol=None,
            compute_dtype=torch.float32,  # approximate prices are all the auction needs
        )
        price_E = (-warm_start_epsilon * res.g).to(torch.float64)
    eps_schedule = [eps if eps_start is None else max(eps_start, eps)]
    while eps_schedule[-1] > eps:
        eps_schedule.append(max(eps_schedule[-1] / eps_factor, eps))
    rounds = 0
    for phase_eps in eps_schedule:
        expert_T, price_E, n = _auction(a, cap, price_E, phase_eps, max_rounds - rounds)
        rounds += n

    tol = 1e-9
    max_repairs = 10 * E if max_repairs is None else max_repairs
    repairs, optimal = 0, False
    while True:
        cycles = _negative_cycles(_move_costs(a, expert_T, E), tol)
        if not cycles:
            optimal = True
            break
        if repairs >= max_repairs:
            warnings.warn(
                f"balanced_assignment: stopped after {repairs} repairs; the assignment is feasible "
                "but not certified optimal",
                RuntimeWarning,
                stacklevel=2,
            )
            break
        moves = []
        for cyc in cycles:
            for e, f in zip(cyc, cyc[1:] + cyc[:1], strict=True):
                loss = torch.where(expert_T == e, a[:, e] - a[:, f], float("inf"))
                moves.append((loss.argmin(), f))
        for t, f in moves:
            expert_T[t] = f
        repairs += len(cycles)
    out[keep] = expert_T
    return AssignmentResult(out, rounds, repairs, optimal)
