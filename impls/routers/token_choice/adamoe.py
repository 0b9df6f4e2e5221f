r"""AdaMoE (Zeng et al., Findings of EMNLP 2024): null experts let the number of real experts vary per token.

AdaMoE adds $m$ **null experts** to a layer's $n$ true experts: zero mappings that cost nothing.
The router is the usual softmax top-$k$ over all $n + m$ logits with a larger $k$; a token that
picks $j$ null experts uses only $k - j$ real ones, so the real experts per token vary from $0$
to $k$ and the average falls below $k$ (Sec. 3.3). The combine weights are renormalized over the
**true experts** among the top-$k$ (Table 4's better option); a token that picks only null
experts skips the layer (zero output).

The balance loss is the Switch loss over all $n + m$ experts with the null experts' fractions
averaged, so the null experts are balanced against the true ones but not among themselves
(Sec. 3.4):

$$
\ell_\text{null} = (n + m) \sum_{i=1}^{n+m} \tilde f_i P_i, \qquad
\tilde f_i = \begin{cases} f_i & i \le n \\ \frac{1}{m}\sum_{j=n+1}^{n+m} f_j & i > n \end{cases}, \qquad
f_i = \frac{1}{|B|}\sum_x \mathbb{1}\{G(x)_i \neq 0\},
$$

with $P_i$ the mean softmax probability (`load_balance`). The plan covers the $n$ true experts
(its `num_experts` is the layer's): null choices are empty slots (`-1`), and
`plan.info["null_fraction"]` is the share of slots that went to null experts.

## Defaults and what is confirmed

From the paper (Sec. 3.3-3.4, 4) and the official code: Mixtral-8x7B with $m = 8$ null experts
and top-3 (the headline setting; the code's Mixtral script uses $m = 16$, top-4), the null
router initialized by copying the true router's weights so that null logits start equal to real
ones, the loss weight annealed from 0.02 (first epoch) to $10^{-4}$ (second).

**Deviations.** One loss weight (0.02) in the preset; the annealing is the training loop's. The
official Mixtral code's null-fraction averaging slices the wrong axis (a no-op there); this
router averages over the null experts as the paper and the Llama-2 code do.

## Usage

```python
import torch, impls

layer = impls.MoELayer(64, 128, router="adamoe_mixtral")     # 8 true + 8 null experts, top-3
out, plan = layer(torch.randn(2, 10, 64))
print(plan.experts_per_token, plan.info["null_fraction"])   # fewer than 3 real experts per token
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from impls.functional import masked_mean, topk, z_loss
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig

__all__ = ["AdaMoEConfig", "AdaMoERouter", "null_expert_balance_loss"]


def null_expert_balance_loss(
    probs_TN: torch.Tensor, ids_TK: torch.Tensor, num_true: int, token_mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """``(n + m) * sum_i f~_i P_i`` over all ``n + m`` experts, null fractions averaged (Sec. 3.4)."""
    T, N = probs_TN.shape
    chosen_TN = torch.zeros(T, N, device=probs_TN.device).scatter(1, ids_TK, 1.0)
    f_N = masked_mean(chosen_TN, token_mask_T)
    if num_true < N:
        null_mean = f_N[num_true:].mean()
        f_N = torch.cat([f_N[:num_true], null_mean.expand(N - num_true)])
    P_N = masked_mean(probs_TN.float(), token_mask_T)
    return N * (f_N * P_N).sum()


@dataclass(frozen=True, kw_only=True)
class AdaMoEConfig(RouterConfig):
    """Options of ``AdaMoERouter`` (``num_experts`` = the true experts ``n``).

    Attributes:
        k: experts chosen among the ``n + m`` (real and null).
        num_null_experts: ``m``.
        copy_init: start the null logits equal to real ones (the null rows copy the true rows
            cyclically, as the official Mixtral code initializes ``gate2``).
    """

    k: int = 3
    num_null_experts: int = 8
    copy_init: bool = True

    def validate(self, num_experts: int) -> None:
        if not isinstance(self.num_null_experts, int) or self.num_null_experts < 0:
            raise ValueError(f"num_null_experts must be an int >= 0, got {self.num_null_experts!r}")
        if not isinstance(self.k, int) or not 1 <= self.k <= num_experts + self.num_null_experts:
            raise ValueError(
                f"k must be in [1, num_experts + num_null_experts = {num_experts + self.num_null_experts}], "
                f"got {self.k!r}"
            )
        if self.has_capacity:
            raise ValueError("AdaMoE routes dropless; capacity_factor is not supported")
        if self.router_bias:
            raise ValueError("AdaMoE's routers have no bias")
        # the shared checks, with k counted over the true and null experts together
        super().validate(num_experts + self.num_null_experts)


@register_router
class AdaMoERouter(Router):
    """Top-k over true and null experts; weights renormalized over the true ones; null fractions averaged.

    Zeng, Miao, Gao, Zhang, Deng, "AdaMoE: Token-Adaptive Routing with Null Experts for
    Mixture-of-Experts Language Models", Findings of EMNLP 2024, arXiv 2406.13233 (Sec. 3.3-3.4).
    """

    name = "adamoe"
    papers = ("adamoe",)
    causal = True
    Config = AdaMoEConfig
    config: AdaMoEConfig

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        m = self.config.num_null_experts
        self.null_gate = nn.Linear(d_model, m, bias=False, dtype=torch.float32) if m else None
        if m and self.config.copy_init:
            with torch.no_grad():
                rows = torch.arange(m) % num_experts
                self.null_gate.weight.copy_(self.gate.weight.float()[rows])

    @property
    def combine_normalization(self) -> float | None:
        return None  # 1 over the true experts, or 0 when a token picked only null experts

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        cfg, n = self.config, self.num_experts
        if self.null_gate is not None:
            null_TM = nn.functional.linear(x_TD.float(), self.null_gate.weight.float())
            null_TM = torch.where(torch.isfinite(null_TM), null_TM, torch.zeros_like(null_TM))
            all_TN = torch.cat([logits_TE, null_TM], dim=-1)
        else:
            all_TN = logits_TE
        probs_TN = torch.softmax(all_TN, dim=-1)
        p_TK, ids_TK = topk(probs_TN, cfg.k)
        real_TK = ids_TK < n
        if token_mask_T is not None:
            real_TK = real_TK & token_mask_T[:, None]
        p_real_TK = p_TK * real_TK
        w_TK = p_real_TK / p_real_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        plan_ids_TK = torch.where(real_TK, ids_TK, -1)
        losses = {
            "load_balance": null_expert_balance_loss(probs_TN, ids_TK, n, token_mask_T),
            "z_loss": z_loss(all_TN, token_mask_T),
        }
        null_fraction = masked_mean((ids_TK >= n).float().mean(-1), token_mask_T)
        return RoutingPlan(
            plan_ids_TK,
            w_TK,
            real_TK,
            probs_TN[:, :n],
            logits_TE,
            losses,
            token_mask_T,
            info={"null_fraction": null_fraction},
        )

    @property
    def max_experts_per_token(self) -> int:
        return self.config.k


ADAMOE_MIXTRAL = register_preset(
    Preset(
        name="adamoe_mixtral",
        router="adamoe",
        options={"k": 3, "num_null_experts": 8},
        num_experts=8,
        layer={"activation": "swiglu"},
        loss_coefficients={"load_balance": 0.02},
        papers=("adamoe",),
        description=(
            "AdaMoE on Mixtral-8x7B (Zeng et al., Findings of EMNLP 2024, arXiv 2406.13233): 8 true + 8 null "
            "experts, top-3 over all 16, weights renormalized over the true experts."
        ),
        deviations="The loss weight 0.02 is the paper's first-epoch value (annealed to 1e-4 in the second).",
    )
)
