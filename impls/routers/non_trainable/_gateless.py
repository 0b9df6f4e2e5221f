"""What the routers without a gate share: no parameters, zero logits, one expert per token, weight 1."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from impls.plan import RoutingPlan, every_slot_plan
from impls.router import Router, RouterConfig


def zero_logits(x_TD: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[T, E]`` zeros that read every input value: a token holding a NaN or an infinity gets a
    non-finite row, so ``Router``'s edge check catches it as for any gate."""
    return (x_TD.sum(-1, keepdim=True) * 0.0).expand(-1, num_experts)


class GatelessRouter(Router):
    """A router whose decision follows a fixed rule (hash, random draw, label): it has no gate.

    ``compute_logits`` returns zeros that still read every input value, so a token holding a NaN or
    an infinity is caught by ``Router``'s edge check like anywhere else.
    """

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        self.gate = None  # no gate parameters

    @property
    def combine_normalization(self) -> float:
        return 1.0

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return zero_logits(x_TD, self.num_experts)

    def one_expert_plan(
        self,
        ids_T: torch.Tensor,
        logits_TE: torch.Tensor,
        token_mask_T: torch.Tensor | None,
        scores_TE: torch.Tensor | None = None,
    ) -> RoutingPlan:
        """Token ``t`` to expert ``ids_T[t]`` with weight 1; the scores default to that choice, one-hot."""
        ids_TK = ids_T[:, None].contiguous()
        if scores_TE is None:
            scores_TE = F.one_hot(ids_T, self.num_experts).float()
        ones_TK = torch.ones_like(ids_TK, dtype=torch.float32)
        return every_slot_plan(ids_TK, ones_TK, scores_TE, logits_TE, token_mask_T)
