r"""Exact balanced linear assignment of tokens to experts: auction algorithm plus optimality repair.

Problem (BASE layers, Lewis et al. 2021): given affinities ``a_TE`` and capacities ``c_E`` with
``sum(c) = T``, choose one expert per token so that expert ``e`` gets exactly ``c_e`` tokens and
``sum_t a[t, e(t)]`` is maximal. It is a linear assignment problem on the *expanded* matrix in
which expert ``e``'s column is repeated ``c_e`` times (one column per slot, or "copy"), and a
transportation problem with ``E`` sinks. Its LP dual has one price ``p_e`` per expert: an
assignment is optimal iff some prices make every token's expert a best choice,
``e(t) ∈ argmax_e (a_te - p_e)``.

Algorithm, all vectorized in torch (loops only over rounds, never over tokens or experts):

1. **Reverse auction for the prices.** Experts bid for tokens, as in the reverse auction of
   Bertsekas, Castañón & Tsaknakis (1993); here in Jacobi form, with ε = 0 and damping, since it
   only has to produce good prices, not the final answer. With the other prices fixed, expert
   ``e``'s *equalizing* price is the one at which exactly ``c_e`` tokens prefer it: the ``c_e``-th
   largest margin ``a_te - max_{f≠e} (a_tf - p_f)`` over the tokens (midway to the next one). All
   experts move to it at once, damped after the first step (``price_damping``). A few steps bring
   the prices close to the optimal duals: on router-like scores with ``T = 16384``, ``E = 64``,
   eight steps leave about ten tokens on over-full experts (none would be left at the optimal
   prices, up to ties). The steps are ``O(T·E)`` each and need no host sync.
2. **Forward auction** (Bertsekas 1988, Jacobi form) from those prices. Each unassigned token
   ``t`` values expert ``e`` at ``a_te - λ_e``, finds its best expert ``e*`` and the value ``w``
   of its best alternative, and bids ``a_te* - w + ε``. Expert ``e`` sorts its bidders by bid and
   its places by the offer that holds them; the ``r``-th highest bidder takes the ``r``-th weakest
   place when it outbids that place's offer, evicting the old holder, and the expert's price rises
   to the best offer it turned away. Every holder stays within ε of its best option
   (ε-complementary slackness). In the first round every token bids; from good prices it leaves a
   handful of tokens without a place, and run to the end the auction would spend tens of rounds
   (one host sync each) passing those few tokens around near-ties in steps of ε. So it stops after
   ``max_rounds`` (default 2); each remaining token then takes its best expert with room
   (``_fill_greedily``), and step 3 settles the near-ties exactly, all at once.
3. **Exact repair.** A feasible assignment is optimal iff its residual network has no negative
   cycle. Condensed onto experts, moving one token from ``e`` to ``f`` costs
   ``W_ef = min_{t in e} (a_te - a_tf)``; a cycle ``e1 → e2 → … → e1`` with negative total cost
   moves one (distinct) token along each edge, keeps every expert's count and raises the total
   affinity. Bellman–Ford on the ``E × E`` matrix (on the host: it is tiny, and reading it is the
   search's one sync), warm-started from the prices, finds a set of vertex-disjoint negative
   cycles. Each is cancelled in bulk: the ``j`` cheapest tokens move along every edge for every
   ``j`` whose unit still lowers the cost (up to 32 per edge). The search repeats until no cycle
   is left (up to ``max_repairs`` cycles); its last distances are then a feasible potential, which
   certifies that the assignment is optimal (``optimal=True``, up to a float64 round-off
   tolerance).

Costs: ``O(T·E)`` per price step, auction round and repair, ``O(E^3)`` host work per cycle
search. The benefits are handled in float64 and rescaled to ``[0, 1]`` (the optimal assignment is
invariant to that).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

#: most tokens moved along one edge of a cancelled cycle in one repair
_BULK = 32


@dataclass(frozen=True, eq=False)
class AssignmentResult:
    """Output of ``balanced_assignment()``.

    Attributes:
        expert_T: ``long [T]`` the expert of every token (``-1`` for excluded tokens).
        rounds: forward-auction rounds run.
        repairs: negative cycles cancelled by the exact repair.
        optimal: True when the repair certified optimality (no negative cycle left).
        searches: negative-cycle searches of the repair (each one device-to-host copy), the
            last one being the search that certified optimality.
    """

    expert_T: torch.Tensor
    rounds: int
    repairs: int
    optimal: bool
    searches: int = 0


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
    counts = torch.zeros(num_groups, dtype=keys.dtype, device=keys.device).index_add_(
        0, keys, torch.ones_like(keys)
    )  # bincount without its host sync on CUDA
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(keys)
    rank[order] = torch.arange(keys.numel(), device=keys.device) - starts[keys[order]]
    return rank


def _best_two(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``v``: best value, its column, and the best value of the other columns."""
    v1, e1 = v.max(dim=1)
    v2 = v.scatter(1, e1[:, None], -float("inf")).amax(dim=1)
    return v1, e1, v2


def _equalizing_prices(
    a: torch.Tensor, cap: torch.Tensor, price: torch.Tensor, steps: int, damping: float, c_max: int
) -> torch.Tensor:
    """Jacobi reverse auction: move every expert's price towards the one that gives it ``cap`` tokens."""
    T, E = a.shape
    active = cap > 0
    k = min(c_max + 1, T)
    lo_idx = cap.clamp_max(k - 1)[None, :]
    hi_idx = (cap - 1).clamp_min(0)[None, :]
    cols = torch.arange(E, device=a.device)[None, :]
    for step in range(steps):
        v1, e1, v2 = _best_two(a - price)
        margin = a - torch.where(cols == e1[:, None], v2[:, None], v1[:, None])
        top = margin.topk(k, dim=0).values  # [k, E], descending per expert
        hi, lo = top.gather(0, hi_idx)[0], top.gather(0, lo_idx)[0]
        target = torch.where(active, 0.5 * (hi + lo), float("inf"))
        price = target if step == 0 else torch.where(active, price + damping * (target - price), target)
    return price


def _auction(
    a: torch.Tensor, cap: torch.Tensor, price_E: torch.Tensor, eps: float, max_rounds: int, c_max: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Uniform-price forward auction from expert prices ``price_E``.

    Returns ``expert_T``, the final prices and the rounds run.

    Expert ``e`` has ``cap[e]`` places, each remembering the offer ``beta`` of the token holding it
    (``-inf`` when free). In the first round every token bids for its best expert at ``price_E``.
    """
    T, E = a.shape
    C = max(c_max, 1)
    dev, dt = a.device, a.dtype
    ninf = torch.tensor(-float("inf"), dtype=dt, device=dev)
    exists = torch.arange(C, device=dev)[None, :] < cap[:, None]
    place_beta = torch.where(exists, ninf, float("inf"))  # missing places can never be taken
    place_tok = torch.full((E, C), -1, dtype=torch.long, device=dev)
    expert_T = torch.full((T + 1,), -1, dtype=torch.long, device=dev)  # [T]: a scratch entry
    price = price_E.clone()
    rounds = 0
    while rounds < max_rounds:
        idx = (expert_T[:T] < 0).nonzero().squeeze(1)  # host sync: the termination check
        if idx.numel() == 0:
            break
        rounds += 1
        v1, e1, v2 = _best_two(a[idx] - price)
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
        expert_T[torch.where(evicted_tok >= 0, evicted_tok, T)] = -1
        place_tok[we, slot] = idx[w]
        place_beta[we, slot] = beta[w]
        expert_T[idx[w]] = we
    else:
        # cap reached: fill the free places greedily (feasible); the exact repair finishes the job
        _fill_greedily(a - price, expert_T[:T], cap)
    return expert_T[:T], price, rounds


def _fill_greedily(v: torch.Tensor, expert_T: torch.Tensor, cap: torch.Tensor) -> None:
    """Give every unassigned token (``-1``) its best expert by value ``v`` that has room, in place.

    Each pass, every such token asks for its best expert with room and each expert accepts as
    many as it has room for, by margin over the token's next choice; every pass fills at least one
    place, and usually one pass places all.
    """
    E = v.shape[1]
    free = cap.clone().index_add_(0, expert_T.clamp_min(0), -(expert_T >= 0).to(cap.dtype))
    while True:
        left = (expert_T < 0).nonzero().squeeze(1)  # host sync, once per pass
        if left.numel() == 0:
            return
        v1, e1, v2 = _best_two(torch.where(free > 0, v[left], -float("inf")))
        ok = _group_rank(e1, v1 - v2, E) < free[e1]  # v2 = -inf: a single choice, rank first
        expert_T[left] = torch.where(ok, e1, -1)
        free.index_add_(0, e1, -ok.to(cap.dtype))


def _move_costs(a: torch.Tensor, expert_T: torch.Tensor, E: int) -> torch.Tensor:
    """``W [E, E]``: cheapest loss of affinity to move one token from expert e to expert f."""
    d = a.gather(1, expert_T[:, None]) - a
    W = torch.full((E, E), float("inf"), dtype=a.dtype, device=a.device)
    return W.scatter_reduce_(0, expert_T[:, None].expand_as(d), d, reduce="amin")


def _negative_cycles(
    W: torch.Tensor, tol: float, dist: torch.Tensor
) -> tuple[list[list[int]], torch.Tensor, bool]:
    """Vertex-disjoint negative-cost cycles of the complete digraph ``W`` (Bellman–Ford, on the host).

    The relaxation starts from any distances ``dist`` (a warm start: minus the auction's prices,
    or the previous search's result, which violate few edges, so few rounds are needed). A round
    without change proves that no negative cycle is left: the distances are then a feasible
    potential (``d_f <= d_e + W_ef`` on every edge), so every cycle costs at least 0. Until then
    every cycle of the predecessor graph has negative cost; the graph is searched for them every
    few rounds. The vertices of the cycles found are taken out of the graph (their edges set to
    ``inf``, their successors' predecessors forgotten) and the relaxation goes on, so one call
    returns a whole set of vertex-disjoint cycles, to be cancelled together, the distances
    reached, and whether they settled. An empty list of cycles with settled distances means that
    no negative cycle exists; the relaxation is capped at ``16·E`` rounds, beyond which (never
    seen) nothing is certified.
    """
    W = W.detach().to("cpu", torch.float64, copy=True)  # the search's one device-to-host copy
    E = W.shape[0]
    W.fill_diagonal_(float("inf"))
    W_l = W.tolist()
    dist = dist.to(torch.float64, copy=True)
    pred = torch.full((E,), -1, dtype=torch.long)
    removed = torch.zeros(E, dtype=torch.bool)
    found: list[list[int]] = []
    for rnd in range(1, 16 * E + 1):
        cand, arg = (dist[:, None] + W).min(0)
        changed = cand < dist - tol
        if not bool(changed.any()):
            return found, dist, True
        dist = torch.where(changed, cand, dist)
        pred = torch.where(changed, arg, pred)
        if rnd % 4 == 0:
            cycles = _predecessor_cycles(pred.tolist(), W_l, tol)
            if cycles:
                found += cycles
                used = torch.tensor([v for cyc in cycles for v in cyc])
                W[used, :] = float("inf")
                W[:, used] = float("inf")
                removed[used] = True
                pred = torch.where(removed[pred.clamp_min(0)] | removed, -1, pred)
    return found, dist, False


def _predecessor_cycles(pred: list[int], W: list[list[float]], tol: float) -> list[list[int]]:
    """The negative cycles of the functional graph ``v -> pred[v]``, each in edge order."""
    E = len(pred)
    state = [0] * E  # 0 unseen, 1 on the current walk, 2 done
    cycles = []
    for start in range(E):
        walk, v = [], start
        while v >= 0 and state[v] == 0:
            state[v] = 1
            walk.append(v)
            v = pred[v]
        if v >= 0 and state[v] == 1:  # closed a new cycle: walk[i:] in predecessor order
            cyc = walk[walk.index(v) :][::-1]  # edges cyc[i] -> cyc[i + 1]
            if sum(W[e][f] for e, f in zip(cyc, cyc[1:] + cyc[:1], strict=True)) < -tol:
                cycles.append(cyc)
        for u in walk:
            state[u] = 2
    return cycles


def _cancel(a: torch.Tensor, expert_T: torch.Tensor, cycles: list[list[int]], tol: float) -> torch.Tensor:
    """Move tokens along every cycle: the ``j`` cheapest per edge, for each ``j`` that still gains."""
    dev = a.device
    src = [e for cyc in cycles for e in cyc]
    dst = [f for cyc in cycles for f in cyc[1:] + cyc[:1]]
    cyc_id = [i for i, cyc in enumerate(cycles) for _ in cyc]
    # one host-to-device copy (a copy from pageable memory waits for the stream)
    src_L, dst_L, cyc_L = torch.tensor([src, dst, cyc_id], dtype=torch.long).to(dev)
    T = a.shape[0]
    m = min(_BULK, T)
    own = a.gather(1, expert_T[:, None])
    cost_TL = torch.where(expert_T[:, None] == src_L[None, :], own - a[:, dst_L], float("inf"))
    vals, toks = cost_TL.topk(m, dim=0, largest=False)  # [m, L], ascending per edge
    unit = torch.zeros((len(cycles), m), dtype=a.dtype, device=dev).index_add_(0, cyc_L, vals.T)
    gain = unit < -tol  # non-decreasing unit costs: a prefix of units per cycle
    move = gain[cyc_L].T  # [m, L]
    target = torch.where(move, dst_L[None, :], -1)
    out = torch.cat([expert_T, expert_T.new_full((1,), -1)])
    out.scatter_(0, torch.where(move, toks, T).flatten(), target.flatten())
    return out[:T]


def balanced_assignment(
    scores_TE: torch.Tensor,
    capacities_E: torch.Tensor | None = None,
    *,
    token_mask_T: torch.Tensor | None = None,
    eps: float = 1e-3,
    max_rounds: int = 2,
    max_repairs: int | None = None,
    price_steps: int = 8,
    price_damping: float = 0.5,
) -> AssignmentResult:
    """Exact balanced assignment maximizing ``sum_t scores[t, expert(t)]`` (see module docs).

    Args:
        scores_TE: ``[T, E]`` affinities (any float dtype; NaN is an error).
        capacities_E: ``long [E]`` tokens per expert summing to the number of valid tokens;
            default ``balanced_capacities()`` (the first ``T % E`` experts take one more).
        token_mask_T: bool ``[T]``; False tokens are left out (``expert_T = -1``).
        eps: forward-auction ε on benefits rescaled to ``[0, 1]``; the auction result is within
            ``T·eps`` of optimal before the repair.
        max_rounds: cap on forward-auction rounds; the tokens still without a place then take
            their best expert with room (0: from the prices straight to that greedy fill).
        max_repairs: cap on cancelled cycles (default ``10 * E``); ``optimal=False`` if hit.
        price_steps: reverse-auction steps for the opening prices (0: start from zero prices).
        price_damping: step size of the price steps after the first, in ``(0, 1]``.
    """
    if scores_TE.dim() != 2 or not scores_TE.is_floating_point():
        raise ValueError("balanced_assignment: scores_TE must be a float tensor of shape [T, E]")
    if price_steps < 0 or not 0.0 < price_damping <= 1.0:
        raise ValueError(
            f"balanced_assignment: need price_steps >= 0 and 0 < price_damping <= 1, got "
            f"{price_steps} and {price_damping}"
        )
    T_all, E = scores_TE.shape
    dev = scores_TE.device
    a_all = scores_TE.detach().to(torch.float64)
    if bool(torch.isnan(a_all).any()):
        raise ValueError("balanced_assignment: scores_TE contains NaN")
    keep = None if token_mask_T is None else token_mask_T.nonzero().squeeze(1)
    a = a_all if keep is None else a_all[keep]
    T = a.shape[0]
    cap = balanced_capacities(T, E, dev) if capacities_E is None else capacities_E.to(dev, torch.long)
    cap_l = cap.tolist() if cap.shape == (E,) else [-1]
    if sum(cap_l) != T or min(cap_l) < 0:
        raise ValueError(f"balanced_assignment: capacities_E must be {E} non-negative ints summing to {T}")
    out = torch.full((T_all,), -1, dtype=torch.long, device=dev)
    if T == 0:
        return AssignmentResult(out, 0, 0, True)
    if sum(c > 0 for c in cap_l) == 1:
        out[slice(None) if keep is None else keep] = cap_l.index(T)
        return AssignmentResult(out, 0, 0, True)
    finite = torch.isfinite(a)
    lo = torch.where(finite, a, float("inf")).amin().clamp_max(0.0)
    hi = torch.where(finite, a, -float("inf")).amax().clamp_min(lo + 1e-300)
    # rescale to [0, 1]; +-inf become strong (finite) preferences outside that range
    a = ((a.clamp(2 * lo - hi - 1, 2 * hi - lo + 1) - lo) / (hi - lo)).nan_to_num()

    c_max = max(cap_l)
    price_E = torch.where(cap > 0, 0.0, float("inf")).to(torch.float64)
    price_E = _equalizing_prices(a, cap, price_E, price_steps, price_damping, c_max)
    expert_T, price_E, rounds = _auction(a, cap, price_E, eps, max_rounds, c_max)

    tol = 1e-9
    max_repairs = 10 * E if max_repairs is None else max_repairs
    repairs, searches, optimal, why = 0, 0, False, ""
    # minus the prices is an almost feasible potential: a warm start for the cycle search
    dist = torch.where(cap > 0, -price_E, 0.0).cpu()
    while True:
        searches += 1
        cycles, dist, settled = _negative_cycles(_move_costs(a, expert_T, E), tol, dist)
        if not cycles:
            optimal, why = settled, "the cycle search did not settle"
            break
        if repairs >= max_repairs:
            why = f"stopped after {repairs} repairs"
            break
        cycles = cycles[: max_repairs - repairs]
        expert_T = _cancel(a, expert_T, cycles, tol)
        repairs += len(cycles)
    if not optimal:
        warnings.warn(
            f"balanced_assignment: {why}; the assignment is feasible but not certified optimal",
            RuntimeWarning,
            stacklevel=2,
        )
    if keep is None:
        return AssignmentResult(expert_T, rounds, repairs, optimal, searches)
    out[keep] = expert_T
    return AssignmentResult(out, rounds, repairs, optimal, searches)
