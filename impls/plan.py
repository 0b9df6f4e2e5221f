"""The routing plan: what a router decided, as one small immutable object.

Shape legend used throughout ``impls`` (suffixes on tensor names):

====  ==========================================================
T     tokens in the routed batch (``batch * seq`` flattened)
D     model width
E     number of routed experts
K     routing slots per token (``k`` for token choice; ``E`` for expert choice)
C     expert capacity (tokens per expert)
F     expert hidden width
B     sequences (examples) in the batch
L     tokens per sequence
S     slots (soft token merging: ``E * slots_per_expert``)
G     merge groups per sequence (expert merging: 1 per example, one per segment, or ``L``)
====  ==========================================================

A plan is **token-major**: every token has ``K`` slots; slot ``j`` of token ``t`` names an expert
(``expert_ids_TK[t, j]``, ``-1`` for an empty slot), a combine weight and whether the assignment
survived capacity (``keep_TK``). This one form expresses

* token choice with a fixed ``k`` (every slot filled),
* a variable number of experts per token (top-p, thresholds, ReLU gates: unused slots are ``-1``),
* expert choice (``K = E``: slot ``e`` is expert ``e``, kept when expert ``e`` picked the token),
* dropped tokens (selected, ``expert_ids_TK >= 0``, but ``keep_TK`` false).

Two routing families do not assign tokens to experts at all, and have their own plans with the
same conventions (float32 tensors, unweighted ``losses``, ``aux_loss()``, the ``DIAGNOSTICS``
names, padding excluded):

* ``SlotPlan`` (soft token merging, Soft MoE): every expert slot takes a convex mixture of a
  sequence's tokens (``dispatch_BLS``), and every token a convex mixture of the slot outputs
  (``combine_BLS``);
* ``MergePlan`` (soft expert merging, SMEAR, Lory, MEO, MoV): one weight vector over the experts per
  group of tokens (``weights_BGE``); the layer averages the experts' *parameters* with it and runs
  the merged expert once per group.

For these two, ``expert_load`` counts *token-equivalents*: the combine (or merge) weight every
valid token gives each expert, summed over tokens, so that it adds up to the number of valid
tokens like a top-1 load does.
"""

from __future__ import annotations

import functools
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
        capacity: tokens per expert when capacity was enforced, else ``None`` (dropless); with
            per-group capacity (``capacity_groups``) the bound over all groups (per-group capacity x
            groups).
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


def _check_shapes(owner: str, want: tuple[int, ...], **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"{owner}.{name} has shape {tuple(t.shape)}, expected {want}")


class _DensePlanMixin:
    """Diagnostics and ``aux_loss`` shared by ``SlotPlan`` and ``MergePlan`` (see the module docstring)."""

    losses: Mapping[str, torch.Tensor]
    token_mask_BL: torch.Tensor | None

    def _expert_weights(self) -> torch.Tensor:
        raise NotImplementedError

    @functools.cached_property
    def expert_weights_BLE(self) -> torch.Tensor:
        """``float32 [B, L, E]``: the weight each token gives each expert (computed once per plan)."""
        return self._expert_weights()

    @property
    def expert_load(self) -> torch.Tensor:
        """``float32 [E]``: token-equivalents per expert (weights summed over valid tokens)."""
        w_BLE, m_BL = self.expert_weights_BLE, self.token_mask_BL
        if m_BL is not None:
            w_BLE = w_BLE * m_BL[..., None]
        return w_BLE.sum((0, 1))

    @property
    def fraction_dropped(self) -> torch.Tensor:
        """Scalar 0: nothing is dropped."""
        return self.expert_weights_BLE.new_zeros(())

    def _token_mean(self, v_BL: torch.Tensor) -> torch.Tensor:
        m_BL = self.token_mask_BL
        if m_BL is None:
            return v_BL.mean()
        m = m_BL.float()
        return (v_BL * m).sum() / m.sum().clamp_min(1)

    @property
    def experts_per_token(self) -> torch.Tensor:
        """Scalar: mean number of experts with a non-zero weight for a valid token."""
        return self._token_mean((self.expert_weights_BLE > 0).sum(-1).float())

    @property
    def router_confidence(self) -> torch.Tensor:
        """Scalar: mean over valid tokens of the largest weight a token gives one expert."""
        return self._token_mean(self.expert_weights_BLE.max(-1).values)

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """All diagnostics by their stable names (tensors; no host sync)."""
        return {name: getattr(self, name) for name in DIAGNOSTICS}

    def aux_loss(self, coefficients: Mapping[str, float]) -> torch.Tensor:
        """``sum(coef[name] * losses[name])``; unknown names are an error (as ``RoutingPlan.aux_loss``)."""
        unknown = set(coefficients) - set(self.losses)
        if unknown:
            raise KeyError(f"no loss named {sorted(unknown)} in this plan; it has {sorted(self.losses)}")
        total = self.expert_weights_BLE.new_zeros(())
        for name, coef in coefficients.items():
            if coef:
                total = total + coef * self.losses[name]
        return total


@dataclass(frozen=True, eq=False)
class SlotPlan(_DensePlanMixin):
    """Soft token merging over ``B`` sequences of ``L`` tokens and ``S = E * p`` slots.

    Attributes:
        dispatch_BLS: ``float32 [B, L, S]`` slot ``s`` takes ``sum_l dispatch[b, l, s] x[b, l]``;
            each column sums to 1 over the valid tokens of its sequence (softmax over tokens).
        combine_BLS: ``float32 [B, L, S]`` token ``l`` gets ``sum_s combine[b, l, s] y[b, s]``; each
            valid token's row sums to 1 (softmax over slots). Padding rows are 0.
        logits_BLS: ``float32 [B, L, S]`` the logits both softmaxes share.
        slots_per_expert: ``p``; slot ``s`` belongs to expert ``s // p``.
        losses: unweighted auxiliary losses by name (Soft MoE has none).
        token_mask_BL: ``bool [B, L]`` valid tokens, or ``None`` when all are valid.
        info: extras (tensors or numbers).
    """

    dispatch_BLS: torch.Tensor
    combine_BLS: torch.Tensor
    logits_BLS: torch.Tensor
    slots_per_expert: int
    losses: Mapping[str, torch.Tensor] = field(default_factory=dict)
    token_mask_BL: torch.Tensor | None = None
    info: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dispatch_BLS.dim() != 3:
            raise ValueError(f"SlotPlan.dispatch_BLS must be [B, L, S], got {tuple(self.dispatch_BLS.shape)}")
        B, L, S = self.dispatch_BLS.shape
        if self.slots_per_expert <= 0 or S % self.slots_per_expert:
            raise ValueError(
                f"SlotPlan: {S} slots are not a multiple of slots_per_expert={self.slots_per_expert}"
            )
        _check_shapes("SlotPlan", (B, L, S), combine_BLS=self.combine_BLS, logits_BLS=self.logits_BLS)
        _check_shapes("SlotPlan", (B, L), token_mask_BL=self.token_mask_BL)
        object.__setattr__(self, "losses", MappingProxyType(dict(self.losses)))
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))

    @property
    def num_slots(self) -> int:
        return self.dispatch_BLS.shape[-1]

    @property
    def num_experts(self) -> int:
        return self.num_slots // self.slots_per_expert

    @property
    def num_tokens(self) -> int:
        return self.dispatch_BLS.shape[0] * self.dispatch_BLS.shape[1]

    def _expert_weights(self) -> torch.Tensor:
        B, L, _ = self.combine_BLS.shape
        return self.combine_BLS.reshape(B, L, self.num_experts, self.slots_per_expert).sum(-1)


@dataclass(frozen=True, eq=False)
class MergePlan(_DensePlanMixin):
    """Soft expert merging: one weight vector over the ``E`` experts per group of tokens.

    A sequence of ``L`` tokens is cut into ``G = ceil(L / group_length)`` consecutive groups (one
    group per example when ``group_length = L``, one per token when it is 1); group ``g`` is
    computed by the expert whose parameters are ``sum_e weights[b, g, e] * theta_e``.

    Attributes:
        weights_BGE: ``float32 [B, G, E]`` merge weights (0 for experts left out of the merge).
        scores_BGE: ``float32 [B, G, E]`` the router's probabilities before any top-k.
        logits_BGE: ``float32 [B, G, E]`` raw router logits.
        group_length: tokens per group (the last group may be shorter).
        losses: unweighted auxiliary losses by name.
        token_mask_BL: ``bool [B, L]`` valid tokens, or ``None`` when all are valid.
        info: extras (tensors or numbers).
    """

    weights_BGE: torch.Tensor
    scores_BGE: torch.Tensor
    logits_BGE: torch.Tensor
    group_length: int
    seq_len: int
    losses: Mapping[str, torch.Tensor] = field(default_factory=dict)
    token_mask_BL: torch.Tensor | None = None
    info: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weights_BGE.dim() != 3:
            raise ValueError(f"MergePlan.weights_BGE must be [B, G, E], got {tuple(self.weights_BGE.shape)}")
        B, G, E = self.weights_BGE.shape
        if self.group_length <= 0 or -(-self.seq_len // self.group_length) != G:
            raise ValueError(
                f"MergePlan: {G} groups do not cover seq_len={self.seq_len} in groups of {self.group_length}"
            )
        _check_shapes("MergePlan", (B, G, E), scores_BGE=self.scores_BGE, logits_BGE=self.logits_BGE)
        _check_shapes("MergePlan", (B, self.seq_len), token_mask_BL=self.token_mask_BL)
        object.__setattr__(self, "losses", MappingProxyType(dict(self.losses)))
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))

    @property
    def num_experts(self) -> int:
        return self.weights_BGE.shape[-1]

    @property
    def num_groups(self) -> int:
        return self.weights_BGE.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.weights_BGE.shape[0] * self.seq_len

    def token_weights(self) -> torch.Tensor:
        """``float32 [B, L, E]``: the merge weights of every token's group."""
        return self.weights_BGE.repeat_interleave(self.group_length, dim=1)[:, : self.seq_len]

    def _expert_weights(self) -> torch.Tensor:
        return self.token_weights()

    @classmethod
    def per_sequence(
        cls,
        weights_BE: torch.Tensor,
        scores_BE: torch.Tensor,
        logits_BE: torch.Tensor,
        token_mask_BL: torch.Tensor,
        losses: Mapping[str, torch.Tensor] | None = None,
    ) -> MergePlan:
        """The plan of one merge group per sequence (none for sequences of length 0)."""
        L = token_mask_BL.shape[1]
        G = 1 if L else 0
        return cls(
            weights_BGE=weights_BE[:, None][:, :G],
            scores_BGE=scores_BE[:, None][:, :G],
            logits_BGE=logits_BE[:, None][:, :G],
            group_length=max(L, 1),
            seq_len=L,
            losses=dict(losses or {}),
            token_mask_BL=token_mask_BL,
        )
