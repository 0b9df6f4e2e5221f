"""Dispatch policies of expert parallelism: on which rank each routed row is computed.

Expert parallelism over ``W`` ranks gives every rank ``E / W`` routed experts, contiguously
(rank ``p`` owns experts ``p * E/W ... (p+1) * E/W - 1``, its *native* experts). A routing plan
fixes, for every source rank ``s`` and expert ``e``, how many rows (token copies) of ``s`` go to
``e``: the count matrix ``counts_RE [W, E]``. A **dispatch policy** turns that matrix into an
``Assignment``: ``rows_RER[s, e, q]`` rows of source ``s`` for expert ``e`` are computed on rank
``q``. Standard expert parallelism computes every row on the expert's native rank; the
system-level balancing methods of the catalog move some rows elsewhere (the computing rank then
receives the expert's weights for that step) or change how a hot rank computes. *Which* expert a
row goes to, and so the layer's result, never changes: only where (and, for ReaLB, in what
precision) it is computed.

Every rank runs the same policy on the same counts and gets the same assignment (the policies are
deterministic functions of the counts; no broadcast is needed). The policies run on the host, on
``[W, E]`` integers: they are schedulers of a few hundred numbers per step, not part of the per-token
path, and some (LLEP's greedy assignment) are sequential by definition.

Within one ``(source, expert)`` pair rows are cut in order: the first rows go to the first
destination of the policy's order (the native rank first where it keeps any), and so on.

Policies:

* ``StandardEP`` — every row on its expert's native rank (GShard; Megatron-Core's all-to-all
  dispatcher).
* ``LeastLoadedEP`` — Least-Loaded Expert Parallelism (Nguyen et al., ICML 2026, arXiv
  2601.17111, §4, Alg. 2-4): when the expert loads are imbalanced (max/mean >= ``lam``), visit
  experts from most to least loaded, keep on the native rank what fits under the capacity
  ``alpha * total / W`` (room held back for its experts not yet visited), and spill the rest in
  chunks of at least ``min_chunk`` rows to the other rank with the least effective load.
* ``FineMoE`` — FineMoE / MicroMoE token scheduling (Zhao et al., arXiv 2511.16947): every expert has
  ``replicas`` copies on different ranks (a circulant placement, so the copy sets cross); per
  micro-batch the rows of each expert are split over its copies by the integer solution of the
  min-max load program ("LPP 1"), solved exactly with SciPy's HiGHS MILP; a source keeps its rows
  on its own copy first (locality-aware routing).
* ``ReLibra`` — routing-replay-guided balancing (Jin et al., arXiv 2605.08639): with the routing
  known ahead (replayed from the rollout), experts are re-placed across nodes once per global
  batch (``plan_placement``) and the hottest experts are replicated inside a node per
  micro-batch.
* ``ReaLB`` — real-time precision switching for multimodal inference (Wang et al., arXiv
  2604.19503): no row moves; hot ranks whose rows are mostly vision tokens compute in emulated
  NVFP4 (``impls.parallel.fp4``).

What each implementation takes from its paper, and where it had to choose, is stated in its class
docstring and on the site's expert-parallelism page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = [
    "POLICIES",
    "Assignment",
    "DispatchPolicy",
    "FineMoE",
    "LeastLoadedEP",
    "ReLibra",
    "ReaLB",
    "StandardEP",
    "build_policy",
    "native_owner",
]


def native_owner(num_experts: int, world_size: int) -> np.ndarray:
    """Native rank of every expert: contiguous blocks of ``E / W`` experts."""
    if world_size <= 0 or num_experts % world_size:
        raise ValueError(
            f"expert parallelism needs num_experts divisible by the world size, got "
            f"num_experts={num_experts}, world_size={world_size}"
        )
    return np.arange(num_experts) // (num_experts // world_size)


@dataclass(frozen=True, eq=False)
class Assignment:
    """Where the rows of one step are computed.

    Attributes:
        rows_RER: ``int64 [W, E, W]``, ``rows_RER[s, e, q]`` rows of source rank ``s`` for expert
            ``e`` computed on rank ``q``; summed over ``q`` it is the step's count matrix.
        owner_E: native rank of every expert.
        low_precision_R: ``bool [W]``, ranks that compute this step in emulated NVFP4 (ReaLB).
        policy: name of the policy that made it.
        info: policy-specific facts (e.g. whether LLEP's imbalance gate fired).
    """

    rows_RER: np.ndarray
    owner_E: np.ndarray
    low_precision_R: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    policy: str = "standard"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        r = np.asarray(self.rows_RER, dtype=np.int64)
        object.__setattr__(self, "rows_RER", r)
        W, E, W2 = r.shape
        if W != W2 or self.owner_E.shape != (E,):
            raise ValueError(f"Assignment: rows_RER {r.shape} and owner_E {self.owner_E.shape} disagree")
        if (r < 0).any():
            raise ValueError("Assignment: negative row counts")
        if self.low_precision_R.size == 0:
            object.__setattr__(self, "low_precision_R", np.zeros(W, dtype=bool))

    @property
    def world_size(self) -> int:
        return self.rows_RER.shape[0]

    @property
    def num_experts(self) -> int:
        return self.rows_RER.shape[1]

    @property
    def counts_RE(self) -> np.ndarray:
        """Rows per (source rank, expert): the routing plan's count matrix."""
        return self.rows_RER.sum(2)

    @property
    def load_R(self) -> np.ndarray:
        """Rows computed on every rank."""
        return self.rows_RER.sum((0, 1))

    @property
    def expert_rank_EW(self) -> np.ndarray:
        """Rows of expert ``e`` computed on rank ``q`` (all sources)."""
        return self.rows_RER.sum(0)

    @property
    def transfers(self) -> list[tuple[int, int]]:
        """``(expert, rank)`` pairs where a rank computes an expert it does not own: the owner sends
        the expert's weights there for the step (and receives their gradient back in training)."""
        on = self.expert_rank_EW > 0
        on[np.arange(self.num_experts), self.owner_E] = False
        return [(int(e), int(q)) for e, q in zip(*np.nonzero(on), strict=True)]

    def check(self, counts_RE: np.ndarray) -> None:
        """Raise ``ValueError`` unless every row of ``counts_RE`` is computed exactly once."""
        if not np.array_equal(self.counts_RE, np.asarray(counts_RE)):
            raise ValueError(f"Assignment ({self.policy}) does not compute every routed row exactly once")

    def max_over_mean(self) -> float:
        load = self.load_R
        mean = load.mean()
        return float(load.max() / mean) if mean > 0 else 1.0


def _standard_rows(counts_RE: np.ndarray, owner_E: np.ndarray) -> np.ndarray:
    W, E = counts_RE.shape
    rows = np.zeros((W, E, W), dtype=np.int64)
    rows[:, np.arange(E), owner_E] = counts_RE
    return rows


def _cut_in_order(counts_R: np.ndarray, chunks: list[tuple[int, int]], world_size: int) -> np.ndarray:
    """Split one expert's rows, in source-rank order, into consecutive chunks ``(rank, rows)``.

    Returns ``[W_src, W_dst]``: how many rows of each source land on each destination.
    """
    src_end = np.cumsum(counts_R)
    src_start = src_end - counts_R
    sizes = np.array([c for _, c in chunks], dtype=np.int64)
    ch_end = np.cumsum(sizes)
    ch_start = ch_end - sizes
    overlap = np.minimum(src_end[:, None], ch_end[None, :]) - np.maximum(
        src_start[:, None], ch_start[None, :]
    )
    overlap = np.clip(overlap, 0, None)
    out = np.zeros((counts_R.shape[0], world_size), dtype=np.int64)
    for j, (q, _) in enumerate(chunks):  # a few chunks per expert
        out[:, q] += overlap[:, j]
    return out


class DispatchPolicy:
    """Base of the dispatch policies. ``assign(counts_RE, ...)`` returns an ``Assignment``.

    Class attributes: ``name`` (registry name), ``papers`` (catalog slugs of the works it
    implements), ``moves_rows`` (whether rows may leave their expert's native rank).
    """

    name: ClassVar[str] = ""
    papers: ClassVar[tuple[str, ...]] = ()
    moves_rows: ClassVar[bool] = True

    def assign(
        self,
        counts_RE: np.ndarray | torch.Tensor,
        *,
        vision_counts_RE: np.ndarray | torch.Tensor | None = None,
    ) -> Assignment:
        counts = _as_counts(counts_RE, "counts_RE")
        owner = native_owner(counts.shape[1], counts.shape[0])
        vision = None if vision_counts_RE is None else _as_counts(vision_counts_RE, "vision_counts_RE")
        if vision is not None and (vision.shape != counts.shape or (vision > counts).any()):
            raise ValueError("vision_counts_RE must have the shape of counts_RE and never exceed it")
        a = self._assign(counts, owner, vision)
        a.check(counts)
        return a

    def _assign(self, counts: np.ndarray, owner: np.ndarray, vision: np.ndarray | None) -> Assignment:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _as_counts(c: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    a = c.detach().cpu().numpy() if isinstance(c, torch.Tensor) else np.asarray(c)
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer) or (a < 0).any():
        raise ValueError(
            f"{name} must be a non-negative integer matrix [world_size, num_experts], got {a.shape}"
        )
    return a.astype(np.int64)


class StandardEP(DispatchPolicy):
    """Every row on its expert's native rank (GShard's all-to-all; Megatron-Core's dispatcher)."""

    name = "standard"
    moves_rows = False

    def _assign(self, counts, owner, vision):
        return Assignment(_standard_rows(counts, owner), owner, policy=self.name)


class LeastLoadedEP(DispatchPolicy):
    """Least-Loaded Expert Parallelism (LLEP; Nguyen et al., ICML 2026, arXiv 2601.17111, §4).

    Alg. 4: with expert loads ``l_e`` (rows of expert ``e`` over all ranks), if
    ``max(l) / mean(l) < lam`` the step runs standard EP. Otherwise Alg. 2 (least-loaded
    assignment): capacity ``m_alpha = alpha * sum(l) / W``; pending native loads ``g_p`` and
    assigned loads ``g_a``; experts are visited by decreasing load (ties: lower id). For expert
    ``e`` with load ``x`` on native rank ``n``: ``g_p[n] -= x``, headroom
    ``a = m_alpha - g_a[n] - g_p[n]`` (room held back for ``n``'s experts not yet visited); if
    ``a >= x`` ``n`` takes all rows, if ``0 < a < x`` it takes the first ``floor(a)`` and spills
    the rest, else it spills all. Alg. 3 (spill): repeatedly sort the other ranks by effective
    load ``g_a + g_p`` (ties: lower rank) and give the first whose headroom allows it
    ``c = min(r, headroom)`` rows, skipping a rank when ``c < min_chunk`` unless ``c`` finishes the
    expert; when no rank qualifies, the least-loaded other rank takes the whole remainder.

    The helper rank receives the expert's weights for the step (not a persistent replica; their
    gradient goes back to the native rank), as in the paper. Which rows move: an expert's rows are
    ordered by source rank, the native rank keeps the first ones (as in the official code).

    Defaults are the paper's experimental settings (§5.1): ``lam=1.3``, ``alpha=1.0``,
    ``min_chunk=1024``. Choices: the gate compares *expert* loads as the paper's Alg. 4 does (the
    official code compares per-rank loads); the capacity is not floored to an integer (the code
    floors it), the native rank's share is ``floor(a)`` rows.
    """

    name = "llep"
    papers = ("llep",)

    def __init__(self, lam: float = 1.3, alpha: float = 1.0, min_chunk: int = 1024):
        if not lam >= 1.0:
            raise ValueError(f"LeastLoadedEP: lam must be >= 1, got {lam}")
        if not alpha > 0:
            raise ValueError(f"LeastLoadedEP: alpha must be > 0, got {alpha}")
        if not isinstance(min_chunk, int) or min_chunk < 1:
            raise ValueError(f"LeastLoadedEP: min_chunk must be an int >= 1, got {min_chunk!r}")
        self.lam, self.alpha, self.min_chunk = float(lam), float(alpha), min_chunk

    def _assign(self, counts, owner, vision):
        W, E = counts.shape
        load = counts.sum(0)
        total = int(load.sum())
        ratio = float(load.max() / load.mean()) if total else 1.0
        if W == 1 or total == 0 or ratio < self.lam:
            return Assignment(
                _standard_rows(counts, owner), owner, policy=self.name, info={"gated": True, "ratio": ratio}
            )
        cap = self.alpha * total / W
        g_p = np.bincount(owner, weights=load, minlength=W).astype(np.float64)
        g_a = np.zeros(W)
        rows = np.zeros((W, E, W), dtype=np.int64)
        order = np.argsort(-load, kind="stable")
        forced = 0
        for e in order:  # Alg. 2: sequential greedy by definition
            x = int(load[e])
            if x == 0:
                continue
            n = int(owner[e])
            g_p[n] -= x
            a = cap - g_a[n] - g_p[n]
            chunks: list[tuple[int, int]] = []
            keep = x if a >= x else max(0, math.floor(a))
            if keep:
                chunks.append((n, keep))
                g_a[n] += keep
            r = x - keep
            while r > 0:  # Alg. 3
                others = sorted((q for q in range(W) if q != n), key=lambda q: (g_a[q] + g_p[q], q))
                pick = None
                for q in others:
                    c = min(r, math.floor(cap - g_a[q] - g_p[q]))
                    if c <= 0 or (c < self.min_chunk and r > c):
                        continue
                    pick = (q, c)
                    break
                if pick is None:
                    pick = (others[0], r)
                    forced += 1
                chunks.append(pick)
                g_a[pick[0]] += pick[1]
                r -= pick[1]
            rows[:, e, :] = _cut_in_order(counts[:, e], chunks, W)
        info = {"gated": False, "ratio": ratio, "capacity": cap, "forced_spills": forced}
        return Assignment(rows, owner, policy=self.name, info=info)


def fine_moe_placement(num_experts: int, world_size: int, replicas: int) -> np.ndarray:
    """Ranks holding each expert's copies, ``[E, replicas]`` (column 0 = the native rank).

    A circulant (Cayley graph of the cyclic group) placement: copy ``j >= 1`` of the ``i``-th
    native expert of rank ``p`` sits on rank ``p + 1 + ((i + j - 1) mod (W - 1))`` (mod ``W``), so
    the copy sets of a rank's experts point to different ranks and cross.
    """
    owner = native_owner(num_experts, world_size)
    if not 1 <= replicas <= world_size:
        raise ValueError(f"FineMoE: replicas must be in [1, world_size={world_size}], got {replicas}")
    local = np.arange(num_experts) % (num_experts // world_size)
    ranks = np.empty((num_experts, replicas), dtype=np.int64)
    ranks[:, 0] = owner
    for j in range(1, replicas):
        ranks[:, j] = (owner + 1 + (local + j - 1) % max(world_size - 1, 1)) % world_size
    return ranks


class FineMoE(DispatchPolicy):
    """FineMoE / MicroMoE token scheduling (Zhao et al., arXiv 2511.16947).

    Each expert ``e`` has copies on the ranks ``fine_moe_placement(E, W, replicas)[e]`` (its
    expert-data-parallel group). Per micro-batch every rank solves the same program (the paper's
    "LPP 1"): minimize ``z`` subject to ``sum_{g in G_e} x[e, g] = l_e`` for every expert and
    ``sum_{e : g in G_e} x[e, g] <= z`` for every rank, here over the integers (SciPy's HiGHS MILP):
    by max-flow integrality its optimum is ``ceil`` of the fractional optimum, which equals the
    largest density ``(1/|S|) sum_{e : G_e subset S} l_e`` over rank subsets ``S``. Rows are then
    routed locality-first: a source rank holding a copy of ``e`` sends its rows for ``e`` to that copy
    up to its quota; the remaining rows, in source order, fill the remaining quotas in rank order.

    Where this differs from the paper: the paper's copies are persistent data-parallel replicas
    (extra memory; gradients all-reduced inside the copy group); here the native rank owns the only
    copy and sends the weights to a computing copy for the step (the compute split and the result
    are the same; the bytes moved are counted by the simulator). The paper's placement is built from
    Cayley graphs or, with known loads, by a greedy + Monte Carlo search; here a fixed circulant
    placement. The scheduler is not warm-started.
    """

    name = "finemoe"
    papers = ("finemoe",)

    def __init__(self, replicas: int = 2):
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"FineMoE: replicas must be an int >= 1, got {replicas!r}")
        self.replicas = replicas

    def quotas(self, load_E: np.ndarray, world_size: int) -> tuple[np.ndarray, int]:
        """Integer rows of every expert on every rank (``[E, W]``) minimizing the largest rank load."""
        from scipy.optimize import Bounds, LinearConstraint, milp

        E = load_E.shape[0]
        R = min(self.replicas, world_size)
        place = fine_moe_placement(E, world_size, R)
        nv = E * R + 1  # x[e, j] then z
        c = np.zeros(nv)
        c[-1] = 1.0
        a_eq = np.zeros((E, nv))
        for j in range(R):
            a_eq[np.arange(E), np.arange(E) * R + j] = 1.0
        a_ub = np.zeros((world_size, nv))
        for j in range(R):
            a_ub[place[:, j], np.arange(E) * R + j] = 1.0
        a_ub[:, -1] = -1.0
        cons = [
            LinearConstraint(a_eq, load_E.astype(float), load_E.astype(float)),
            LinearConstraint(a_ub, -np.inf, 0.0),
        ]
        res = milp(c, constraints=cons, integrality=np.ones(nv), bounds=Bounds(0, np.inf))
        if not res.success:  # pragma: no cover - HiGHS solves these small programs
            raise RuntimeError(f"FineMoE: the scheduling program failed: {res.message}")
        x = np.rint(res.x[:-1]).astype(np.int64).reshape(E, R)
        quota = np.zeros((E, world_size), dtype=np.int64)
        for j in range(R):
            np.add.at(quota, (np.arange(E), place[:, j]), x[:, j])
        return quota, int(np.rint(res.x[-1]))

    def _assign(self, counts, owner, vision):
        W, E = counts.shape
        load = counts.sum(0)
        if W == 1 or self.replicas == 1 or load.sum() == 0:
            return Assignment(_standard_rows(counts, owner), owner, policy=self.name)
        quota, z = self.quotas(load, W)
        rows = np.zeros((W, E, W), dtype=np.int64)
        local = np.minimum(counts, quota.T)  # [W, E]: a source's rows kept on its own copy
        rows[np.arange(W)[:, None], np.arange(E)[None, :], np.arange(W)[:, None]] = local
        rest_RE = counts - local
        left_EW = quota - local.T
        for e in np.nonzero(rest_RE.sum(0))[0]:  # fill the remaining quotas in rank order
            chunks = [(int(q), int(left_EW[e, q])) for q in range(W) if left_EW[e, q] > 0]
            rows[:, e, :] += _cut_in_order(rest_RE[:, e], chunks, W)
        return Assignment(rows, owner, policy=self.name, info={"optimal_max_load": z})


class ReLibra(DispatchPolicy):
    """Routing-replay-guided balancing (ReLibra; Jin et al., arXiv 2605.08639).

    In reinforcement-learning training the rollout has already routed every token of the batch,
    and routing replay reuses those decisions in training, so the loads are known before the step.
    ReLibra balances on two timescales: across nodes once per global batch (experts re-placed by
    the replayed loads of the whole batch), and inside a node per micro-batch (hot experts
    replicated onto other GPUs of the same node). Those two mechanisms are what the paper's
    abstract defines; the algorithms that realize them here are MoE Atlas' own, since the method
    sections were not available to read:

    * ``plan_placement(load_E)`` (once per global batch, with the replayed loads): longest-first
      greedy, every node keeps ``E / nodes`` experts and every rank ``E / W`` experts: experts by
      decreasing load (ties: lower id) each go to the node with the least load among those with
      room, then within a node to the least-loaded rank with room.
    * ``assign(counts)`` (every micro-batch): start from the placement; inside every node, while
      the most-loaded rank exceeds the least-loaded one by more than ``1 + tol`` times, move rows of
      its hottest expert to the least-loaded rank of the node, enough to even the two, at most
      ``max_moves`` times per node.

    The placement is state of the policy instance: give every MoE layer its own ``ReLibra`` (and
    call ``layer.policy.plan_placement(replayed_loads_E, world_size)`` per layer, with the loads its
    replayed routing gives, e.g. ``counts_from_plan(plan, W).sum(0)``). Without a
    ``plan_placement`` call the placement is the native one. Experts whose planned rank is
    not their native rank receive their weights for the step (the paper moves them for the whole
    global batch); the simulator counts those bytes.
    """

    name = "relibra"
    papers = ("relibra",)

    def __init__(self, ranks_per_node: int = 1, tol: float = 0.05, max_moves: int = 8):
        if not isinstance(ranks_per_node, int) or ranks_per_node < 1:
            raise ValueError(f"ReLibra: ranks_per_node must be an int >= 1, got {ranks_per_node!r}")
        if tol < 0:
            raise ValueError(f"ReLibra: tol must be >= 0, got {tol}")
        self.ranks_per_node, self.tol, self.max_moves = ranks_per_node, float(tol), int(max_moves)
        self.placement_E: np.ndarray | None = None

    def plan_placement(self, load_E: np.ndarray | torch.Tensor, world_size: int) -> np.ndarray:
        """Re-place the experts across nodes and ranks for the replayed loads of a global batch."""
        load = np.asarray(
            load_E.detach().cpu() if isinstance(load_E, torch.Tensor) else load_E, dtype=np.int64
        )
        E, W, P = load.shape[0], world_size, self.ranks_per_node
        native_owner(E, W)
        if W % P:
            raise ValueError(f"ReLibra: ranks_per_node={P} does not divide world_size={W}")
        nodes, per_rank = W // P, E // W
        node_load, node_room = np.zeros(nodes), np.full(nodes, per_rank * P)
        rank_load, rank_room = np.zeros(W), np.full(W, per_rank)
        place = np.empty(E, dtype=np.int64)
        for e in np.argsort(-load, kind="stable"):
            n = min((i for i in range(nodes) if node_room[i] > 0), key=lambda i: (node_load[i], i))
            q = min(
                (r for r in range(n * P, (n + 1) * P) if rank_room[r] > 0), key=lambda r: (rank_load[r], r)
            )
            place[e] = q
            node_load[n] += load[e]
            node_room[n] -= 1
            rank_load[q] += load[e]
            rank_room[q] -= 1
        self.placement_E = place
        return place

    def _assign(self, counts, owner, vision):
        W, E = counts.shape
        P = self.ranks_per_node
        if W % P:
            raise ValueError(f"ReLibra: ranks_per_node={P} does not divide world_size={W}")
        place = owner if self.placement_E is None else self.placement_E
        if place.shape != (E,) or (np.bincount(place, minlength=W) != E // W).any():
            raise ValueError(
                "ReLibra: the planned placement does not fit this layer (call plan_placement again)"
            )
        load = counts.sum(0)
        # per expert, the chunks (rank, rows) it is cut into, in order
        split = {e: [(int(place[e]), int(load[e]))] for e in range(E) if load[e]}
        rank_load = np.bincount(place, weights=load, minlength=W).astype(np.int64)
        moves = 0
        for n in range(W // P):
            ranks = np.arange(n * P, (n + 1) * P)
            for _ in range(self.max_moves):
                hi = int(ranks[np.argmax(rank_load[ranks])])
                lo = int(ranks[np.argmin(rank_load[ranks])])
                if rank_load[hi] <= (1 + self.tol) * rank_load[lo] or hi == lo:
                    break
                # the hottest expert computed on `hi`
                on_hi = [(sum(c for q, c in split[e] if q == hi), e) for e in split]
                amount, e = max(on_hi, key=lambda t: (t[0], -t[1]))
                move = min(amount, (rank_load[hi] - rank_load[lo]) // 2)
                if move <= 0:
                    break
                chunks = split[e]
                i = max(i for i, (q, _) in enumerate(chunks) if q == hi)
                q_hi, c_hi = chunks[i]
                chunks[i] = (q_hi, c_hi - move)
                chunks.append((lo, move))
                split[e] = [(q, c) for q, c in chunks if c > 0]
                rank_load[hi] -= move
                rank_load[lo] += move
                moves += 1
        rows = np.zeros((W, E, W), dtype=np.int64)
        for e, chunks in split.items():
            rows[:, e, :] = _cut_in_order(counts[:, e], chunks, W)
        return Assignment(rows, owner, policy=self.name, info={"replications": moves})


class ReaLB(DispatchPolicy):
    """Real-time precision switching for multimodal MoE inference (ReaLB; Wang et al., arXiv
    2604.19503).

    ReaLB balances without moving a token or copying an expert: per layer and per step it lowers the
    precision of the expert computation on the ranks that the current routing overloads with
    vision-dominated work (FP4 tensor cores in the paper), so the slowest rank finishes sooner while
    text-heavy ranks stay exact. Here: rows stay on their native ranks; a rank computes this step in
    emulated NVFP4 (``impls.parallel.fp4``: E2M1 values, one E4M3 scale per 16 values, a float32
    tensor scale) when the step has more than ``batch_threshold`` rows, its load exceeds
    ``hot_factor`` times the mean rank load, and at least ``modality_threshold`` of its rows are
    vision tokens (``vision_counts_RE``; without modality information every row counts as vision).

    The paper states the mechanism (precision per rank, per layer, at run time; vision-heavy ranks
    only; no token movement); the thresholds' defaults (0.7, 2048 rows) are those reported for it,
    and the hot-rank rule (above ``hot_factor`` times the mean load) is MoE Atlas' own, since the
    method sections were not available to read. Meant for inference: in training the switched
    rank's gradient passes straight through the quantizer.
    """

    name = "realb"
    papers = ("realb",)
    moves_rows = False

    def __init__(
        self,
        modality_threshold: float = 0.7,
        batch_threshold: int = 2048,
        hot_factor: float = 1.0,
        fp4_speedup: float = 2.0,
    ):
        if not 0.0 <= modality_threshold <= 1.0:
            raise ValueError(f"ReaLB: modality_threshold must be in [0, 1], got {modality_threshold}")
        if batch_threshold < 0:
            raise ValueError(f"ReaLB: batch_threshold must be >= 0, got {batch_threshold}")
        if hot_factor <= 0 or fp4_speedup < 1:
            raise ValueError("ReaLB: hot_factor must be > 0 and fp4_speedup >= 1")
        self.modality_threshold, self.batch_threshold = float(modality_threshold), int(batch_threshold)
        self.hot_factor, self.fp4_speedup = float(hot_factor), float(fp4_speedup)

    def _assign(self, counts, owner, vision):
        W = counts.shape[0]
        rows = _standard_rows(counts, owner)
        load = rows.sum((0, 1))
        vis = rows.sum((0, 1)) if vision is None else _standard_rows(vision, owner).sum((0, 1))
        share = np.divide(vis, load, out=np.zeros(W), where=load > 0)
        low = np.zeros(W, dtype=bool)
        if load.sum() > self.batch_threshold:
            low = (load > self.hot_factor * load.mean()) & (share >= self.modality_threshold)
        info = {"vision_share": share.tolist()}
        return Assignment(rows, owner, low_precision_R=low, policy=self.name, info=info)

    def compute_time_R(self, a: Assignment) -> np.ndarray:
        """Relative compute time per rank: rows, divided by ``fp4_speedup`` on switched ranks."""
        return np.where(a.low_precision_R, a.load_R / self.fp4_speedup, a.load_R)


POLICIES: dict[str, type[DispatchPolicy]] = {
    p.name: p for p in (StandardEP, LeastLoadedEP, FineMoE, ReLibra, ReaLB)
}


def build_policy(policy: str | DispatchPolicy | None, **options: Any) -> DispatchPolicy:
    """A policy instance from a name (``"standard"``, ``"llep"``, ``"finemoe"``, ``"relibra"``,
    ``"realb"``) and its options, or the instance itself."""
    if policy is None:
        return StandardEP()
    if isinstance(policy, DispatchPolicy):
        if options:
            raise TypeError("build_policy: options need a policy name")
        return policy
    if policy not in POLICIES:
        raise ValueError(f"unknown dispatch policy {policy!r}; known: {sorted(POLICIES)}")
    return POLICIES[policy](**options)
