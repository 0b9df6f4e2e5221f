r"""Dense softmax gating: every expert contributes (MMoE, LoRAMoE, MoLE, DS-MoE, EvoMoE dense-to-sparse).

The oldest gate: a softmax over all $E$ experts weights every expert's output,

$$
g(x) = \operatorname{softmax}\!\big(x W_g / \tau\big), \qquad y = \sum_{i=1}^{E} g_i(x) \, E_i(x).
$$

* **MMoE** (Ma et al. 2018) gives each of $n$ tasks its own gate over shared experts,
  $y^k = \sum_i g^k_i(x) E_i(x)$. Here `num_tasks` gates share one projection; `router.task`
  selects the gate of a plain call, `router.route_tasks(x)` returns one plan per task and
  `impls.MoELayer.forward_tasks` runs the experts once for all tasks.
* **LoRAMoE** (Dou et al. 2023) and **MoLE** (Wu et al. 2024) mix LoRA experts densely with this
  gate; the experts themselves (LoRA adapters inside a frozen FFN) are outside the router.
* **DS-MoE** (Pan et al. 2024) trains densely and infers sparsely: in `eval()` only the top
  `eval_k` experts (or those with weight above `eval_threshold`) are computed. Its
  mutual-information loss rewards a balanced *average* gate and a confident *per-token* gate,
  $\mathcal{L}_\text{MI} = -H\big(\tfrac{1}{T}\sum_t g(x_t)\big) + \tfrac{1}{T}\sum_t H\big(g(x_t)\big)$
  (returned as `mutual_information`).
* **EvoMoE** (Nie et al. 2021) uses a *dense-to-sparse* gate: Gumbel noise and a temperature
  annealed from high (near-uniform, dense) to low (peaked), with experts below a weight
  threshold dropped, so the active set shrinks during training:
  $g(x) = \operatorname{softmax}\big((x W_g + \gamma)/\tau\big)$, $\gamma \sim \operatorname{Gumbel}(0, 1)$.
  ``dense_to_sparse_temperature()`` gives an exponential schedule; set `router.temperature`.

Losses (unweighted): `importance` (CV² of each expert's summed gate, Shazeer et al.'s importance
loss, the usual balance term for dense gates), `mutual_information` and `entropy` (mean per-token
gate entropy).

## Defaults and what is confirmed

All the papers confirm the dense softmax mechanism. Not confirmed: EvoMoE's temperature range
and threshold (the schedule's defaults 2.0 → 0.3 and the preset's threshold are assumptions),
DS-MoE's inference rule ($k$ or threshold; the preset uses top-2 of the raw probabilities) and
LoRAMoE's localized balancing constraint, which needs per-sample type labels and is not
modelled.

## Usage

```python
import torch, impls

mmoe = impls.build_router("mmoe", d_model=32, num_experts=4)        # 2 task gates
plans = mmoe.route_tasks(torch.randn(6, 32))
print(len(plans), plans[0].weights_TK.sum(-1))                     # 2 plans, weights sum to 1

layer = impls.MoELayer(32, 64, router="mmoe", num_experts=4)
outs, plans = layer.forward_tasks(torch.randn(2, 3, 32))           # one mixture per task

ds = impls.build_router("ds_moe", d_model=32, num_experts=8)
ds.eval()
print(ds(torch.randn(3, 32)).experts_per_token)                    # 2 at inference, 8 in training

evo = impls.build_router("evomoe", d_model=32, num_experts=8)
evo.temperature = impls.routers.dense.dense_softmax.dense_to_sparse_temperature(step=900, total_steps=1000)
```
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from impls.functional import cv_squared, entropy, masked_mean, topk
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig

__all__ = ["DenseGateConfig", "DenseGateRouter", "dense_to_sparse_temperature"]


def dense_to_sparse_temperature(step: int, total_steps: int, start: float = 2.0, end: float = 0.3) -> float:
    """Exponential temperature schedule ``start * (end/start) ** min(step/total_steps, 1)``."""
    if total_steps <= 0 or start <= 0 or end <= 0:
        raise ValueError(f"need total_steps > 0 and positive temperatures, got {total_steps}, {start}, {end}")
    frac = min(max(step, 0) / total_steps, 1.0)
    return start * (end / start) ** frac


@dataclass(frozen=True, kw_only=True)
class DenseGateConfig(RouterConfig):
    """Options of ``DenseGateRouter``.

    Attributes:
        num_tasks: separate gates over the same experts (MMoE).
        temperature: initial softmax temperature (``router.temperature`` can change it).
        gumbel: add Gumbel noise to the logits in training (EvoMoE).
        threshold: drop experts whose weight is below it (EvoMoE's sparsification), any mode.
        eval_k: in ``eval()`` keep only the top ``eval_k`` experts (DS-MoE sparse inference).
        eval_threshold: in ``eval()`` keep only experts with weight above it.
        k: unused by the selection; sets the capacity formula only.
    """

    num_tasks: int = 1
    temperature: float = 1.0
    gumbel: bool = False
    threshold: float | None = None
    eval_k: int | None = None
    eval_threshold: float | None = None

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {self.num_tasks}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("threshold", "eval_threshold"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < 1:
                raise ValueError(f"{name} must be in [0, 1) or None, got {v}")
        if self.eval_k is not None and not 1 <= self.eval_k <= num_experts:
            raise ValueError(f"eval_k must be in [1, num_experts={num_experts}] or None, got {self.eval_k}")


@register_router
class DenseGateRouter(Router):
    """Dense softmax gate over all experts, with per-task gates and dense-to-sparse options.

    Ma, Zhao, Yi, Chen, Hong, Chi, "Modeling Task Relationships in Multi-task Learning with
    Multi-gate Mixture-of-Experts", KDD 2018 (eq. 5-6). Dou et al., "LoRAMoE", 2023,
    arXiv 2312.09979. Wu, Huang, Wei, "Mixture of LoRA Experts", ICLR 2024. Pan et al., "Dense
    Training, Sparse Inference: Rethinking Training of Mixture-of-Experts Language Models", 2024,
    arXiv 2404.05567. Nie et al., "EvoMoE: An Evolutional Mixture-of-Experts Training Framework
    via Dense-To-Sparse Gate", 2021, arXiv 2112.14397.
    """

    name = "dense_softmax"
    papers = ("mmoe", "loramoe", "mole", "ds-moe", "evomoe")
    causal = True
    Config = DenseGateConfig

    def __init__(self, d_model: int, num_experts: int, config=None, **options):
        super().__init__(d_model, num_experts, config, **options)
        cfg = self.config
        if cfg.num_tasks > 1:
            self.gate = nn.Linear(
                d_model, num_experts * cfg.num_tasks, bias=cfg.router_bias, dtype=torch.float32
            )
        self.temperature = cfg.temperature
        self.task = 0

    def _sparse(self) -> bool:
        cfg = self.config
        if cfg.threshold is not None:
            return True
        return not self.training and (cfg.eval_k is not None or cfg.eval_threshold is not None)

    @property
    def max_experts_per_token(self) -> int:
        cfg = self.config
        return cfg.eval_k if (not self.training and cfg.eval_k is not None) else self.num_experts

    @property
    def combine_normalization(self) -> float | str:
        return "at_most_one" if self._sparse() else 1.0

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(x_TD)
        if self.config.num_tasks > 1:
            if not 0 <= self.task < self.config.num_tasks:
                raise ValueError(f"router.task={self.task} outside [0, {self.config.num_tasks})")
            E = self.num_experts
            logits = logits[:, self.task * E : (self.task + 1) * E]
        return logits

    def route_tasks(
        self,
        x_TD: torch.Tensor,
        token_mask_T: torch.Tensor | None = None,
        *,
        sequence_length: int | None = None,
    ) -> Sequence[RoutingPlan]:
        """One plan per task gate (MMoE), in task order."""
        saved, plans = self.task, []
        try:
            for t in range(self.config.num_tasks):
                self.task = t
                plans.append(self(x_TD, token_mask_T, sequence_length=sequence_length))
        finally:
            self.task = saved
        return plans

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        cfg, E = self.config, self.num_experts
        h_TE = logits_TE
        if self.training and cfg.gumbel:
            u = torch.rand_like(h_TE).clamp(1e-10, 1 - 1e-10)
            h_TE = h_TE - torch.log(-torch.log(u))
        probs_TE = torch.softmax(h_TE / self.temperature, dim=-1)
        T = probs_TE.shape[0]
        if not self.training and cfg.eval_k is not None:
            w_TK, ids_TK = topk(probs_TE, cfg.eval_k)
        else:
            ids_TK = torch.arange(E, device=probs_TE.device).expand(T, E)
            w_TK = probs_TE
        use_TK = torch.ones_like(w_TK, dtype=torch.bool)
        thr = cfg.threshold if cfg.threshold is not None else (None if self.training else cfg.eval_threshold)
        if thr is not None:
            use_TK = (w_TK >= thr) | (w_TK == w_TK.max(-1, keepdim=True).values)  # never empty
        if token_mask_T is not None:
            use_TK = use_TK & token_mask_T[:, None]
        ids_TK = torch.where(use_TK, ids_TK, -1)
        w_TK = torch.where(use_TK, w_TK, torch.zeros_like(w_TK))
        mean_TE = masked_mean(probs_TE, token_mask_T)
        mean_entropy = entropy(probs_TE, token_mask_T)
        losses = {
            "importance": cv_squared(mean_TE),
            "mutual_information": -entropy(mean_TE[None, :]) + mean_entropy,
            "entropy": mean_entropy,
        }
        return RoutingPlan(
            ids_TK, w_TK, use_TK, probs_TE, logits_TE, losses, token_mask_T, info={"task": self.task}
        )


MMOE = register_preset(
    Preset(
        name="mmoe",
        router="dense_softmax",
        options={"num_tasks": 2},
        papers=("mmoe",),
        description="MMoE (Ma et al. 2018): one softmax gate per task (2 here) over shared experts.",
        deviations="The task count is the caller's; MMoE's task towers are outside the layer.",
    )
)
LORAMOE = register_preset(
    Preset(
        name="loramoe",
        router="dense_softmax",
        papers=("loramoe", "mole"),
        loss_coefficients={"importance": 0.01},
        description="LoRAMoE / MoLE dense gate (Dou et al. 2023; Wu et al. 2024): softmax over all experts.",
        deviations=(
            "Experts are full MLPs, not LoRA adapters; LoRAMoE's localized balancing constraint (needs "
            "sample type labels) is replaced by the plain importance loss."
        ),
    )
)
DS_MOE = register_preset(
    Preset(
        name="ds_moe",
        router="dense_softmax",
        options={"eval_k": 2},
        loss_coefficients={"mutual_information": 0.01},
        papers=("ds-moe",),
        description=(
            "DS-MoE (Pan et al. 2024, arXiv 2404.05567): dense training, top-2 sparse inference, MI loss."
        ),
        deviations="Inference k = 2 and the MI loss weight are assumptions.",
    )
)
EVOMOE = register_preset(
    Preset(
        name="evomoe",
        router="dense_softmax",
        options={"gumbel": True, "temperature": 2.0, "threshold": 0.05},
        papers=("evomoe",),
        description=(
            "EvoMoE dense-to-sparse gate (Nie et al. 2021, arXiv 2112.14397): Gumbel softmax, annealed "
            "temperature."
        ),
        deviations=(
            "Temperature range and the weight threshold are assumptions; the schedule is left to the caller."
        ),
    )
)
