r"""Yuan 2.0-M32's attention router: expert scores from attention among the experts (Wu et al. 2024).

A linear router scores each expert on its own. Yuan 2.0-M32 (Sec. 3) lets the scores of the
experts depend on one another: the token $I \in \mathbb{R}^d$ is projected three times to one
value per expert,

$$
Q = W I, \quad K = W' I, \quad V = W'' I, \qquad W, W', W'' \in \mathbb{R}^{N \times d},
\qquad P = \operatorname{Softmax}(Q K^\top)\, V \in \mathbb{R}^N,
$$

an $N \times N$ attention in which expert $i$ attends to every expert $j$ with weight
$\operatorname{softmax}_j(Q_i K_j)$ (within one token: there is no mixing across tokens, so the
router stays causal). The $M = 2$ largest entries of $P$ pick the experts, and a softmax over
those two logits gives the combine weights (they sum to 1). There is no scaling of $Q K^\top$,
no bias and no mask.

The paper describes no balance loss and the released pre-training script disables it
(`--moe-router-load-balancing-type none`); the plan still offers the Switch-form
`load_balance` on $\operatorname{softmax}(P)$ and `z_loss`, for use with a coefficient of your
choice (the preset uses none).

## Defaults and what is confirmed

$N = 32$, $M = 2$ and the equations are the paper's (Sec. 3, no equation numbers); the order
"top-2 of the logits, then softmax over the two", the float32 router, the bias-free projections
and the missing scale are the released Megatron, Hugging Face and vLLM code's, which agree.

## Usage

```python
import torch, impls

router = impls.build_router("yuan_2_m32", d_model=64)      # 32 experts, top-2
plan = router(torch.randn(10, 64))
print(plan.expert_ids_TK, plan.weights_TK.sum(-1))         # weights sum to 1
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from impls.functional import load_balance_loss, z_loss
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig
from impls.routers.token_choice.topk import topk_softmax

__all__ = ["AttentionRouter", "AttentionRouterConfig", "expert_attention_logits"]


def expert_attention_logits(q_TE: torch.Tensor, k_TE: torch.Tensor, v_TE: torch.Tensor) -> torch.Tensor:
    """``P = softmax(q k^T) v`` per token: ``[T, N]`` from three ``[T, N]`` projections (float32)."""
    attn_TEE = torch.softmax(q_TE[:, :, None] * k_TE[:, None, :], dim=-1)
    return (attn_TEE * v_TE[:, None, :]).sum(-1)


@dataclass(frozen=True, kw_only=True)
class AttentionRouterConfig(RouterConfig):
    """Options of ``AttentionRouter`` (``k`` 2 by default: Yuan 2.0-M32's M)."""

    k: int = 2

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.k == 1:
            raise ValueError(
                "k=1 makes the only combine weight the constant 1 (softmax over one logit), so the router "
                "gets no gradient from the task loss; use k >= 2"
            )


@register_router
class AttentionRouter(Router):
    """Yuan 2.0-M32 attention router: ``softmax(Q K^T) V`` over the experts, top-k, softmax of the k.

    Wu et al., "Yuan 2.0-M32: Mixture of Experts with Attention Router", 2024, arXiv 2405.17976,
    Sec. 3 (Attention Router).
    """

    name = "attention_router"
    papers = ("yuan-2-m32",)
    causal = True
    Config = AttentionRouterConfig

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        bias = self.config.router_bias
        self.gate = None
        self.query = nn.Linear(d_model, num_experts, bias=bias, dtype=torch.float32)
        self.key = nn.Linear(d_model, num_experts, bias=bias, dtype=torch.float32)
        self.value = nn.Linear(d_model, num_experts, bias=bias, dtype=torch.float32)

    @property
    def combine_normalization(self) -> float:
        return 1.0

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``P`` of the paper: the router logits, one per expert."""

        def proj(lin: nn.Linear) -> torch.Tensor:
            b = lin.bias.float() if lin.bias is not None else None
            return nn.functional.linear(x_TD, lin.weight.float(), b)

        return expert_attention_logits(proj(self.query), proj(self.key), proj(self.value))

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        # top-k of the logits, then a softmax over the k kept ones (the released code's order)
        probs_TE, ids_TK, w_TK = topk_softmax(logits_TE, self.config.k, order="after")
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        losses = {
            "load_balance": load_balance_loss(probs_TE, ids_TK, token_mask_T),
            "z_loss": z_loss(logits_TE, token_mask_T),
        }
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        return RoutingPlan(ids_TK, w_TK, keep_TK, probs_TE, logits_TE, losses, token_mask_T)


YUAN_2_M32 = register_preset(
    Preset(
        name="yuan_2_m32",
        router="attention_router",
        options={"k": 2},
        num_experts=32,
        layer={"activation": "swiglu"},
        loss_coefficients={},
        papers=("yuan-2-m32",),
        description=(
            "Yuan 2.0-M32 (Wu et al. 2024, arXiv 2405.17976): 32 SwiGLU experts, attention router, top-2, "
            "softmax over the two selected logits, no balance loss."
        ),
        deviations="none known (the released script trains without a balance loss; so does the preset).",
    )
)
