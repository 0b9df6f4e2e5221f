r"""Task-level MoE: a router that reads a learned task representation, not the token (Ye et al. 2022).

Ye, Zha and Ren route whole tasks: every token of a task takes the same experts, chosen from a
learned **task embedding** $u_t$ (initialized from a task vector, e.g. averaged text encodings,
and trained). In every MoE layer a small MLP maps it to one logit per expert,

$$
r_\ell(t) = W_2 \, \operatorname{GELU}(W_1 u_t), \qquad W_1 \in \mathbb{R}^{64 \times d_\text{task}},
$$

and the experts are selected by a **straight-through Gumbel-softmax** (the released default):
the forward pass uses the hard one-hot of $\arg\max_e (r_e + g_e)$, $g \sim \text{Gumbel}(0, 1)$,
the backward pass the gradient of $\operatorname{softmax}((r + g)/\tau)$. The temperature decays
after every optimizer step, $\tau = \max(\tau_0 e^{-\rho \cdot \text{step}}, \tau_\text{min})$.
With `selection="softmax"` every expert is used with weight $\operatorname{softmax}(r/\tau)$, the
soft routing of the paper's second stage (which also restarts the experts from the pretrained
weights and anneals $\tau$ from 300 down to 1: a training-loop matter).

In the paper an expert is a whole Transformer layer and a layer's output is the weighted sum of
its experts'; here the experts are whatever the layer holds (FFNs in `impls.MoELayer`). The
router needs the task of every token: `router(x, task_ids=ids)` (per token or per sequence).
`on_optimizer_step()` (or `impls.step_routers(model)`) advances the temperature schedule.

## Defaults and what is confirmed

From the official code (the paper's text beyond its abstract was not read here): $m = 3$
experts per layer, router hidden size 64 with GELU, straight-through Gumbel top-1,
$\tau_0 = 2$, $\rho = 3 \cdot 10^{-4}$, $\tau_\text{min} = 0.1$, task embedding dimension 768
(trainable), no auxiliary loss.

**Deviations.** The released code keeps adding Gumbel noise at evaluation (its test routes are
random); here evaluation takes the noise-free argmax, deterministic. Task vectors start random
(pass your own with `router.task_embedding.weight.copy_(...)`).

## Usage

```python
import torch, impls

router = impls.build_router("task_level_moe", d_model=32, num_tasks=5)    # 3 experts
plan = router(torch.randn(4, 10, 32), task_ids=torch.tensor([0, 1, 1, 4]))
print(plan.expert_ids_TK.view(4, 10)[:, 0])                                 # one expert per task
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from impls.functional import topk
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig

__all__ = ["TaskLevelConfig", "TaskLevelRouter"]


@dataclass(frozen=True, kw_only=True)
class TaskLevelConfig(RouterConfig):
    """Options of ``TaskLevelRouter``.

    Attributes:
        num_tasks: number of task embeddings (4 unless given).
        task_dim: dimension of the task embedding (768 in the official code).
        hidden: hidden width of the router MLP (64).
        selection: ``"gumbel_st"`` (straight-through Gumbel top-1) or ``"softmax"`` (all experts).
        tau_start, tau_decay, tau_min: the temperature schedule
            ``max(tau_start * exp(-tau_decay * step), tau_min)``.
        k: must be 1 (top-1 selection).
    """

    num_tasks: int = 4
    task_dim: int = 768
    hidden: int = 64
    selection: Literal["gumbel_st", "softmax"] = "gumbel_st"
    tau_start: float = 2.0
    tau_decay: float = 3e-4
    tau_min: float = 0.1

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        for name in ("num_tasks", "task_dim", "hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.selection not in ("gumbel_st", "softmax"):
            raise ValueError(f"selection must be 'gumbel_st' or 'softmax', got {self.selection!r}")
        if not (self.tau_start > 0 and self.tau_min > 0 and self.tau_decay >= 0):
            raise ValueError("tau_start and tau_min must be > 0 and tau_decay >= 0")
        if self.k != 1:
            raise ValueError(f"task-level routing selects one expert per task (k=1), got k={self.k}")
        if self.has_capacity:
            raise ValueError("task-level routing drops no token; capacity_factor is not supported")


@register_router
class TaskLevelRouter(Router):
    """Task-level routing: an MLP on a learned task embedding, straight-through Gumbel top-1.

    Ye, Zha, Ren, "Eliciting and Understanding Cross-task Skills with Task-level
    Mixture-of-Experts", Findings of EMNLP 2022, arXiv 2205.12701 (router on task
    representations; equation numbers not checked).
    """

    name = "task_level"
    papers = ("task-level-moe",)
    causal = True
    Config = TaskLevelConfig
    config: TaskLevelConfig
    routing_inputs = ("task_ids",)
    fp32_buffers = ("optimizer_steps",)

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        cfg = self.config
        self.gate = None
        self.task_embedding = nn.Embedding(cfg.num_tasks, cfg.task_dim, dtype=torch.float32)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.task_dim, cfg.hidden, dtype=torch.float32),
            nn.GELU(),
            nn.Linear(cfg.hidden, num_experts, dtype=torch.float32),
        )
        self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.float32))

    def input_ranges(self) -> dict[str, int]:
        return {"task_ids": self.config.num_tasks}

    @property
    def temperature(self) -> torch.Tensor:
        cfg = self.config
        tau = cfg.tau_start * torch.exp(-cfg.tau_decay * self.optimizer_steps)
        return tau.clamp_min(cfg.tau_min)

    @property
    def max_experts_per_token(self) -> int:
        return self.num_experts if self.config.selection == "softmax" else 1

    @property
    def combine_normalization(self) -> float:
        return 1.0

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The task's logits ``r(t)`` for every token (they read ``x`` only to catch non-finite tokens)."""
        u_TU = self.task_embedding(self.inputs["task_ids"]).float()
        w1, w2 = self.mlp[0], self.mlp[2]
        h = nn.functional.gelu(nn.functional.linear(u_TU, w1.weight.float(), w1.bias.float()))
        r_TE = nn.functional.linear(h, w2.weight.float(), w2.bias.float())
        return r_TE + x_TD.sum(-1, keepdim=True) * 0.0

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        E, T = self.num_experts, logits_TE.shape[0]
        tau = self.temperature
        if self.config.selection == "softmax":
            probs_TE = torch.softmax(logits_TE / tau, dim=-1)
            ids_TK = torch.arange(E, device=logits_TE.device).expand(T, E)
            w_TK = probs_TE
        else:
            if self.training:
                # one Gumbel draw per task and step (the routes of a task's tokens stay identical)
                ids_T = self.inputs["task_ids"]
                g_JE = -torch.log(-torch.log(torch.rand(self.config.num_tasks, E, device=logits_TE.device)))
                z_TE = logits_TE + g_JE[ids_T].clamp(-30, 30)
            else:
                z_TE = logits_TE
            probs_TE = torch.softmax(z_TE / tau, dim=-1)
            ids_TK = topk(z_TE.detach(), 1)[1]
            soft_TK = probs_TE.gather(1, ids_TK)
            w_TK = soft_TK - soft_TK.detach() + 1.0  # straight-through: 1 forward, soft gradient
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        return RoutingPlan(ids_TK, w_TK, keep_TK, probs_TE, logits_TE, {}, token_mask_T, info={"tau": tau})

    @torch.no_grad()
    def on_optimizer_step(self, process_group=None) -> None:
        """Advance the temperature schedule by one step."""
        self.optimizer_steps += 1


TASK_LEVEL_MOE = register_preset(
    Preset(
        name="task_level_moe",
        router="task_level",
        options={"task_dim": 768, "hidden": 64, "selection": "gumbel_st"},
        num_experts=3,
        papers=("task-level-moe",),
        description=(
            "Task-level MoE (Ye et al., Findings of EMNLP 2022, arXiv 2205.12701): 3 experts per layer, a "
            "64-unit GELU router on a learned 768-d task embedding, straight-through Gumbel top-1, "
            "temperature max(2 exp(-3e-4 step), 0.1)."
        ),
        deviations=(
            "Values from the official code. Its experts are whole Transformer layers (here: the layer's "
            "experts); evaluation is the noise-free argmax (the code samples there too)."
        ),
    )
)
