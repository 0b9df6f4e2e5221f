"""A single-process simulator of expert parallelism: per-rank loads and bytes moved for a routing plan.

``simulate(counts_RE, policy, ...)`` runs the very ``DispatchPolicy.assign`` that ``ExpertParallel``
runs, and reports what the step would cost on ``W`` ranks without starting any process:

* ``load_R`` — rows (token copies) each rank computes, ``max_load``, ``mean_load``, ``imbalance``
  (max / mean) and ``max_vio`` (DeepSeek's MaxVio, max / mean - 1);
* ``token_bytes`` — hidden-state bytes that cross ranks in the forward pass (dispatch and combine
  all-to-alls; rows that stay on their source rank cost nothing), ``weight_bytes`` — expert
  weights sent to ranks that compute an expert they do not own; the backward pass moves the same
  amounts again (gradients), reported as ``step_bytes`` = 2 x (tokens + weights);
* ``compute_time_R`` — rows per rank with ReaLB's low-precision ranks divided by its speed-up, and
  ``makespan`` — the slowest rank's compute time over the mean rows per rank (what the step waits
  for; equal to ``imbalance`` for the policies that only move rows).

``counts_from_plan(plan, world_size)`` cuts a single-process plan's tokens into ``W`` equal
contiguous shards (the ranks' batches) and counts the kept rows per ``(rank, expert)``;
``counts_from_expert_ids`` does the same from saved routing traces (``expert_ids [T, K]`` per
layer, e.g. the arena's ``--dump-routing`` files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from impls.parallel.policies import Assignment, DispatchPolicy, ReaLB, build_policy
from impls.plan import RoutingPlan

__all__ = ["Simulation", "counts_from_expert_ids", "counts_from_plan", "simulate"]


def counts_from_expert_ids(
    expert_ids_TK: torch.Tensor | np.ndarray,
    num_experts: int,
    world_size: int,
    keep_TK: torch.Tensor | np.ndarray | None = None,
) -> np.ndarray:
    """Rows per ``(rank, expert)`` when the ``T`` tokens are split into ``W`` equal contiguous shards.

    Empty slots (``-1``) and slots with ``keep_TK`` False are not rows.
    """
    ids = torch.as_tensor(expert_ids_TK).long()
    if ids.dim() != 2:
        raise ValueError(f"expert_ids must be [tokens, slots], got shape {tuple(ids.shape)}")
    T = ids.shape[0]
    if world_size <= 0 or T % world_size:
        raise ValueError(f"the {T} tokens do not split into world_size={world_size} equal shards")
    keep = ids >= 0
    if keep_TK is not None:
        keep = keep & torch.as_tensor(keep_TK).bool()
    if ids.numel() and int(ids.max()) >= num_experts:
        raise ValueError(f"expert id {int(ids.max())} out of range for num_experts={num_experts}")
    rank_T = torch.arange(T) // (T // world_size)
    key = (rank_T[:, None] * num_experts + ids.clamp_min(0))[keep]
    return torch.bincount(key, minlength=world_size * num_experts).view(world_size, num_experts).numpy()


def counts_from_plan(plan: RoutingPlan, world_size: int) -> np.ndarray:
    """``counts_from_expert_ids`` of a plan's kept slots."""
    return counts_from_expert_ids(
        plan.expert_ids_TK.cpu(), plan.num_experts, world_size, (plan.keep_TK & plan.selected_TK).cpu()
    )


@dataclass(frozen=True)
class Simulation:
    """What one step costs under a policy (see the module docstring)."""

    policy: str
    assignment: Assignment
    load_R: np.ndarray
    compute_time_R: np.ndarray
    token_bytes: int
    weight_bytes: int
    transfers: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def max_load(self) -> int:
        return int(self.load_R.max())

    @property
    def mean_load(self) -> float:
        return float(self.load_R.mean())

    @property
    def imbalance(self) -> float:
        return self.max_load / self.mean_load if self.mean_load else 1.0

    @property
    def max_vio(self) -> float:
        return self.imbalance - 1.0

    @property
    def makespan(self) -> float:
        return float(self.compute_time_R.max() / self.mean_load) if self.mean_load else 1.0

    @property
    def step_bytes(self) -> int:
        return 2 * (self.token_bytes + self.weight_bytes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "load": self.load_R.tolist(),
            "max_load": self.max_load,
            "mean_load": self.mean_load,
            "imbalance": self.imbalance,
            "compute_time": self.compute_time_R.tolist(),
            "makespan": self.makespan,
            "token_bytes": self.token_bytes,
            "weight_bytes": self.weight_bytes,
            "step_bytes": self.step_bytes,
            "transfers": self.transfers,
            "low_precision_ranks": np.nonzero(self.assignment.low_precision_R)[0].tolist(),
            **self.info,
        }


def simulate(
    counts_RE: np.ndarray | torch.Tensor,
    policy: str | DispatchPolicy | None = None,
    *,
    d_model: int = 0,
    bytes_per_value: int = 4,
    expert_numel: int = 0,
    vision_counts_RE: np.ndarray | torch.Tensor | None = None,
    **policy_options: Any,
) -> Simulation:
    """Per-rank loads and bytes of one step (``counts_RE [W, E]``, see ``counts_from_plan``).

    ``d_model`` and ``bytes_per_value`` size a row (hidden state); ``expert_numel`` is the number of
    parameters of one expert (weights sent per transfer). With the defaults (0) only loads are
    meaningful.
    """
    pol = build_policy(policy, **policy_options)
    a = pol.assign(counts_RE, vision_counts_RE=vision_counts_RE)
    W = a.world_size
    cross = a.rows_RER.sum(1)  # [src, dst]
    moved_rows = int(cross.sum() - np.trace(cross))
    token_bytes = 2 * moved_rows * d_model * bytes_per_value  # dispatch + combine
    transfers = len(a.transfers)
    weight_bytes = transfers * expert_numel * bytes_per_value
    time = pol.compute_time_R(a) if isinstance(pol, ReaLB) else a.load_R.astype(float)
    return Simulation(
        policy=pol.name,
        assignment=a,
        load_R=a.load_R,
        compute_time_R=np.asarray(time, dtype=float),
        token_bytes=token_bytes,
        weight_bytes=weight_bytes,
        transfers=transfers,
        info={"world_size": W, **a.info},
    )
