"""The routing plan: what a router decided, as one small immutable object.

Shape legend used throughout ``impls`` (suffixes on tensor names):

====  ==========================================================
T     tokens in the routed batch (``batch * seq`` flattened)
D     model width
E     number of routed experts
K     routing slots per token (``k`` for token choice; ``E`` for expert choice)
C     expert capacity (tokens per expert)
F     expert hidden width
====  ==========================================================

A plan is **token-major**: every token has ``K`` slots; slot ``j`` of token ``t`` names an expert
(``expert_ids_TK[t, j]``, ``-1`` for an empty slot), a combine weight and whether the assignment
survived capacity (``keep_TK``). This one form expresses

* token choice with a fixed ``k`` (every slot filled),
* a variable number of experts per token (top-p, thresholds, ReLU gates: unused slots are ``-1``),
* expert choice (``K = E``: slot ``e`` is expert ``e``, kept when expert ``e`` picked the token),
* dropped tokens (selected, ``expert_ids_TK >= 0``, but ``keep_TK`` false).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

#: Stable names of the diagnostics every plan offers (shown on the site's router pages).
DIAGNOSTICS = ("expert_load", "fraction_dropped", "experts_per_token", "router_confidence")


@dataclass(frozen=True, eq=False)
class RoutingPlan:
    """Routing decision for ``T`` tokens over ``E`` experts.

    Attributes:
        expert_ids_TK: ``long [T, K]`` chosen expert per slot, ``-1`` where the slot is empty.
        weights_TK: ``float32 [T, K]`` combine weights, ``0`` for empty or dropped slots.
        keep_TK: ``bool [T, K]`` slot is routed and survived capacity (the expert computes it).
        scores_TE: ``float32 [T, E]`` the scores the router routed on (probabilities for
            softmax routers, sigmoid affinities, transport plan, ...).
        logits_TE: ``float32 [T, E]`` raw gate logits before any normalization.
        losses: unweighted auxiliary loss terms by name (``load_balance``, ``z_loss``, ...),
            scalar tensors computed from this very decision. Weight them with ``aux_loss()``.
        token_mask_T: ``bool [T]`` valid (non-padding) tokens, or ``None`` when all are valid.
        capacity: tokens per expert when capacity was enforced, else ``None`` (dropless).
        info: router-specific extras (e.g. Sinkhorn iterations used), tensors or numbers.
    """

    expert_ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    keep_TK: torch.Tensor
    scores_TE: torch.Tensor
    logits_TE: torch.Tensor
    losses: Mapping[str, torch.Tensor] = field(default_factory=dict)
    token_mask_T: torch.Tensor | None = None
    capacity: int | None = None
    info: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        T, K = self.expert_ids_TK.shape
        E = self.scores_TE.shape[-1]
        for name, t, shape in (
            ("weights_TK", self.weights_TK, (T, K)),
            ("keep_TK", self.keep_TK, (T, K)),
            ("scores_TE", self.scores_TE, (T, E)),
            ("logits_TE", self.logits_TE, (T, E)),
        ):
            if tuple(t.shape) != shape:
                raise ValueError(f"RoutingPlan.{name} has shape {tuple(t.shape)}, expected {shape}")
        if self.keep_TK.dtype != torch.bool:
            raise ValueError(f"RoutingPlan.keep_TK must be bool, got {self.keep_TK.dtype}")
        if self.expert_ids_TK.dtype != torch.long:
            raise ValueError(f"RoutingPlan.expert_ids_TK must be int64, got {self.expert_ids_TK.dtype}")
        if self.token_mask_T is not None and tuple(self.token_mask_T.shape) != (T,):
            raise ValueError(
                f"RoutingPlan.token_mask_T has shape {tuple(self.token_mask_T.shape)}, expected ({T},)"
            )
        object.__setattr__(self, "losses", MappingProxyType(dict(self.losses)))
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))

    # ------------------------------------------------------------------ sizes
    @property
    def num_tokens(self) -> int:
        return self.expert_ids_TK.shape[0]

    @property
    def num_experts(self) -> int:
        return self.scores_TE.shape[-1]

    @property
    def slots(self) -> int:
        return self.expert_ids_TK.shape[1]

    # ------------------------------------------------------------------ masks
    @property
    def selected_TK(self) -> torch.Tensor:
        """``bool [T, K]``: the router chose an expert for this slot (kept or dropped)."""
        sel = self.expert_ids_TK >= 0
        if self.token_mask_T is not None:
            sel = sel & self.token_mask_T[:, None]
        return sel

    @property
    def dropped_TK(self) -> torch.Tensor:
        """``bool [T, K]``: chosen but over capacity, so the expert does not compute it."""
        return self.selected_TK & ~self.keep_TK

    # ------------------------------------------------------------------ diagnostics
    @property
    def expert_load(self) -> torch.Tensor:
        """``float32 [E]``: tokens each expert computes (kept assignments, padding excluded)."""
        keep = self.keep_TK & self.selected_TK
        ids = self.expert_ids_TK.clamp_min(0)
        load = torch.zeros(self.num_experts, device=ids.device, dtype=torch.float32)
        return load.scatter_add_(0, ids.reshape(-1), keep.reshape(-1).float())

    @property
    def fraction_dropped(self) -> torch.Tensor:
        """Scalar: dropped assignments / chosen assignments (0 when nothing was chosen)."""
        chosen = self.selected_TK.sum()
        return self.dropped_TK.sum() / chosen.clamp_min(1)

    @property
    def experts_per_token(self) -> torch.Tensor:
        """Scalar: mean number of experts computing each valid token (after drops)."""
        per_token = (self.keep_TK & self.selected_TK).sum(-1).float()
        if self.token_mask_T is None:
            return per_token.mean()
        m = self.token_mask_T.float()
        return (per_token * m).sum() / m.sum().clamp_min(1)

    @property
    def router_confidence(self) -> torch.Tensor:
        """Scalar: mean over valid tokens of the largest score (1 = fully confident)."""
        top = self.scores_TE.max(-1).values
        if self.token_mask_T is None:
            return top.mean()
        m = self.token_mask_T.float()
        return (top * m).sum() / m.sum().clamp_min(1)

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """All diagnostics by their stable names (tensors; no host sync)."""
        return {name: getattr(self, name) for name in DIAGNOSTICS}

    # ------------------------------------------------------------------ losses
    def aux_loss(self, coefficients: Mapping[str, float]) -> torch.Tensor:
        """The one place loss coefficients are applied: ``sum(coef[name] * losses[name])``.

        Names in ``coefficients`` that this router did not produce are an error (a typo would
        otherwise silently disable a loss); losses without a coefficient are not added.
        """
        unknown = set(coefficients) - set(self.losses)
        if unknown:
            raise KeyError(f"no loss named {sorted(unknown)} in this plan; it has {sorted(self.losses)}")
        total = self.scores_TE.new_zeros(())
        for name, coef in coefficients.items():
            if coef:
                total = total + coef * self.losses[name]
        return total


def every_slot_plan(
    expert_ids_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    scores_TE: torch.Tensor,
    logits_TE: torch.Tensor,
    token_mask_T: torch.Tensor | None = None,
    *,
    losses: Mapping[str, torch.Tensor] | None = None,
    info: Mapping[str, object] | None = None,
) -> RoutingPlan:
    """A plan in which every slot of every valid token is computed (before any capacity).

    Padding tokens (``token_mask_T`` False) keep no slot and get zero weights.
    """
    keep_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
    if token_mask_T is not None:
        keep_TK = keep_TK & token_mask_T[:, None]
        weights_TK = torch.where(keep_TK, weights_TK, torch.zeros_like(weights_TK))
    return RoutingPlan(
        expert_ids_TK=expert_ids_TK,
        weights_TK=weights_TK,
        keep_TK=keep_TK,
        scores_TE=scores_TE,
        logits_TE=logits_TE,
        losses=dict(losses or {}),
        token_mask_T=token_mask_T,
        info=dict(info or {}),
    )
