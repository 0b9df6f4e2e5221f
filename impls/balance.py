"""Global-batch load balancing: the balance loss with assignment fractions from the whole batch.

The Switch loss ``E * sum_i f_i P_i`` computed per micro-batch (or per data-parallel rank) pushes
every small shard towards balance, which over-constrains the router. The *global-batch* variant
takes ``f`` from all tokens of the optimizer step (all ranks, all micro-batches so far) while
``P`` stays local, so it only asks the whole batch to be balanced (Megatron-LM's
``global_aux_loss``; Qiu et al. 2025, "Demons in the Detail", arXiv 2501.11873).

Partition invariance: with ``f`` shared, the token-weighted mean of the shard losses equals the
loss of the concatenated batch (the loss is linear in ``P``), which is what
``impls.functional.load_balance_loss_from_counts()`` computes and the tests check.

``GlobalLoadBalance`` keeps the running counts: call ``GlobalLoadBalance.loss()`` for
each micro-batch's plan (counts are all-reduced over ``process_group`` when given) and
``GlobalLoadBalance.reset()`` once per optimizer step. Counts are detached and kept in float32.
"""

from __future__ import annotations

import torch

from impls.functional import expert_counts, load_balance_loss_from_counts
from impls.plan import RoutingPlan

__all__ = ["GlobalLoadBalance"]


class GlobalLoadBalance:
    """Running expert counts over the micro-batches (and ranks) of one optimizer step.

    Not an ``nn.Module`` and not global state: one instance per MoE layer, owned by the caller.
    """

    def __init__(self, num_experts: int, process_group=None):
        if num_experts <= 0:
            raise ValueError(f"num_experts must be > 0, got {num_experts}")
        self.num_experts = num_experts
        self.process_group = process_group
        self.counts_E: torch.Tensor | None = None

    def observe(self, plan: RoutingPlan) -> torch.Tensor:
        """Add this plan's routed counts (summed over ranks) to the running counts; return them."""
        if plan.num_experts != self.num_experts:
            raise ValueError(f"plan has {plan.num_experts} experts, this tracker {self.num_experts}")
        with torch.no_grad():
            c = expert_counts(plan.expert_ids_TK, self.num_experts, plan.token_mask_T)
            if self.process_group is not None and torch.distributed.is_initialized():
                torch.distributed.all_reduce(c, group=self.process_group)
            self.counts_E = c if self.counts_E is None else self.counts_E.to(c.device) + c
        return self.counts_E

    def loss(self, plan: RoutingPlan, probs_TE: torch.Tensor | None = None) -> torch.Tensor:
        """Global-batch balance loss of this micro-batch: global ``f``, local ``P`` (balanced -> 1).

        ``probs_TE`` defaults to the plan's scores (router probabilities for softmax routers).
        """
        counts = self.observe(plan)
        probs = plan.scores_TE if probs_TE is None else probs_TE
        return load_balance_loss_from_counts(probs, counts, plan.token_mask_T)

    def reset(self) -> None:
        """Forget the counts; call once per optimizer step."""
        self.counts_E = None
