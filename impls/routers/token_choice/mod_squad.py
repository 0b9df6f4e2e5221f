r"""Mod-Squad: task-specific routers over shared experts, and a task–expert mutual-information loss.

Chen et al. (CVPR 2023) build a multi-task model in which every task has its own router over
one shared pool of experts. A token $x$ of task $t$ is scored by that task's gate,
$p(e \mid x, t) = \operatorname{softmax}(W_t x)_e$, and goes to its top-$k$ experts, weighted by
the raw probabilities. To make each task use a small, distinct subset of the experts — so that a
compact single-task model can later be extracted — training maximizes the **mutual information
between tasks and experts**, estimated from the batch's soft routing probabilities:

$$
P(t, e) = \frac{1}{N} \sum_{x \in \text{task } t} p(e \mid x, t), \qquad
P(t) = \sum_e P(t, e), \quad P(e) = \sum_t P(t, e),
$$

$$
\mathcal{L}_\text{MI} = -\sum_{t, e} P(t, e) \log \frac{P(t, e)}{P(t)\,P(e)}
= -I(T; E),
$$

$N$ the number of valid tokens. Minimizing $-I(T; E) = H(E \mid T) - H(E)$ both spreads the
load over all experts (high $H(E)$) and concentrates each task on few of them (low
$H(E \mid T)$). The plan returns it as `mutual_information`, with the Switch `load_balance` and
`z_loss`. The router needs the task of every token: `router(x, task_ids=ids)` (one id per token
or per sequence).

## Defaults and what is confirmed

From the official code (the paper's text was not read here): task gates initialized at zero,
no bias; raw softmax probabilities as combine weights (not renormalized); MI weight 0.005 with
the Switch and z-losses off; MoE MLP layers with 16 experts, top-4 (the `mod_squad` preset);
MoE attention layers with 24 head-experts, top-12.

**Deviations.** The official code accumulates the statistics over one forward pass per task
(every image goes through the backbone once for each task) and adds $10^{-4}$ to the
probabilities and inside the logarithm; here one batch holds tokens of several tasks, the
statistics come from that batch, and the logarithm is taken of probabilities clamped at
$10^{-12}$. The MoE attention layers and the extraction of task sub-networks are not part of the
router.

## Usage

```python
import torch, impls

router = impls.build_router("mod_squad", d_model=32, num_tasks=3)     # 16 experts, top-4
x, tasks = torch.randn(4, 10, 32), torch.tensor([0, 1, 2, 0])         # one task per sequence
plan = router(x, task_ids=tasks)
print(plan.losses["mutual_information"])                               # -I(T; E), <= 0
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from impls.functional import load_balance_loss, topk, z_loss
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig

__all__ = ["ModSquadConfig", "ModSquadRouter", "task_expert_mutual_information"]


def task_expert_mutual_information(
    probs_TE: torch.Tensor, task_ids_T: torch.Tensor, num_tasks: int, token_mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """``I(T; E)`` of the joint ``P(t, e)`` estimated from soft routing probabilities (nats)."""
    E = probs_TE.shape[-1]
    valid_T = torch.ones_like(probs_TE[:, 0]) if token_mask_T is None else token_mask_T.to(probs_TE.dtype)
    joint_JE = torch.zeros(num_tasks, E, dtype=probs_TE.dtype, device=probs_TE.device)
    joint_JE = joint_JE.index_add(0, task_ids_T, probs_TE * valid_T[:, None])
    joint_JE = joint_JE / valid_T.sum().clamp_min(1)
    p_J = joint_JE.sum(-1, keepdim=True)
    p_E = joint_JE.sum(0, keepdim=True)
    ratio = joint_JE.clamp_min(1e-12) / (p_J * p_E).clamp_min(1e-12)
    return (joint_JE * torch.log(ratio)).sum()


@dataclass(frozen=True, kw_only=True)
class ModSquadConfig(RouterConfig):
    """Options of ``ModSquadRouter``.

    Attributes:
        num_tasks: number of tasks, one router each (4 unless given).
        k: experts per token.
        zero_init: start every task's gate at zero (the official code).
    """

    num_tasks: int = 4
    k: int = 4
    zero_init: bool = True

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if not isinstance(self.num_tasks, int) or self.num_tasks < 1:
            raise ValueError(f"num_tasks must be an int >= 1 (one router per task), got {self.num_tasks!r}")


@register_router
class ModSquadRouter(Router):
    """Task-specific top-k routers over shared experts with the task-expert mutual-information loss.

    Chen et al., "Mod-Squad: Designing Mixtures of Experts As Modular Multi-Task Learners",
    CVPR 2023, arXiv 2212.08066 (mutual-information loss; equation numbers not checked).
    """

    name = "mod_squad_router"
    papers = ("mod-squad",)
    causal = True
    Config = ModSquadConfig
    config: ModSquadConfig
    routing_inputs = ("task_ids",)

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        cfg = self.config
        self.gate = None
        w = torch.empty(cfg.num_tasks, num_experts, d_model, dtype=torch.float32)
        if cfg.zero_init:
            nn.init.zeros_(w)
        else:
            for t in range(cfg.num_tasks):  # init only: PyTorch's default Linear init per task
                nn.init.kaiming_uniform_(w[t], a=5**0.5)
        self.task_gates = nn.Parameter(w)

    def input_ranges(self) -> dict[str, int]:
        return {"task_ids": self.config.num_tasks}

    @property
    def combine_normalization(self) -> str:
        return "at_most_one"

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``W_t x`` with ``t`` the token's task."""
        w_TED = self.task_gates.float()[self.inputs["task_ids"]]
        return torch.einsum("ted,td->te", w_TED, x_TD)

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        probs_TE = torch.softmax(logits_TE, dim=-1)
        w_TK, ids_TK = topk(probs_TE, self.config.k)
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        mi = task_expert_mutual_information(
            probs_TE, self.inputs["task_ids"], self.config.num_tasks, token_mask_T
        )
        losses = {
            "mutual_information": -mi,
            "load_balance": load_balance_loss(probs_TE, ids_TK, token_mask_T),
            "z_loss": z_loss(logits_TE, token_mask_T),
        }
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        return RoutingPlan(ids_TK, w_TK, keep_TK, probs_TE, logits_TE, losses, token_mask_T)


MOD_SQUAD = register_preset(
    Preset(
        name="mod_squad",
        router="mod_squad_router",
        options={"k": 4},
        num_experts=16,
        loss_coefficients={"mutual_information": 0.005},
        papers=("mod-squad",),
        description=(
            "Mod-Squad MoE MLP (Chen et al., CVPR 2023, arXiv 2212.08066): 16 shared experts, one zero-"
            "initialized top-4 router per task, mutual-information loss weight 0.005."
        ),
        deviations=(
            "Values from the official code; the paper's text was not read. The MoE attention layers (24 "
            "head-experts, top-12) are not modelled; num_tasks is the caller's."
        ),
    )
)
