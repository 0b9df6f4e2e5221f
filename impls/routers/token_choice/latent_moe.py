r"""LatentMoE (Elango et al. 2026; NVIDIA Nemotron 3): route in model space, run the experts in a latent.

LatentMoE keeps the router on the model-width hidden state $h \in \mathbb{R}^d$ but runs the routed
experts on a down-projected latent $u = W_\downarrow h \in \mathbb{R}^\ell$ ($\ell < d$), projecting
their mixture back up; the shared expert stays in model space:

$$
y = W_\uparrow \Big( \sum_{e \in \operatorname{TopK}(h)} p_e(h)\, \operatorname{FFN}_e(W_\downarrow h) \Big)
+ \operatorname{Shared}(h).
$$

Each routed expert then costs $\ell / d$ of a full-width one, so more (and more active) experts fit
the same budget; the two projections are one pair per layer. Routing is whatever router the layer
is given (Nemotron 3 uses DeepSeek-V3-style sigmoid scores with a selection bias:
`nemotron_3_super`). `LatentMoELayer(d_model, latent_dim, d_hidden, router=...)` is the layer.

## Defaults and what is confirmed

From Megatron-Core's implementation (`moe_latent_size`) and the Nemotron 3 Super configuration:
$d = 4096$, $\ell = 1024$, 512 routed experts, top-22, sigmoid scores with an expert bias,
renormalized and scaled by 5.0, a sequence-level balance loss of weight $10^{-4}$, and a shared
expert on $h$. The LatentMoE paper's text was not read here.

**Deviations.** The bias update speed ($10^{-3}$) is DeepSeek-V3's, not stated for Nemotron 3.
The projections have no bias.

## Usage

```python
import torch
from impls.routers.token_choice.latent_moe import LatentMoELayer

layer = LatentMoELayer(64, 16, 32, num_experts=16, router="deepseek", k=4, num_shared_experts=1)
y, plan = layer(torch.randn(2, 10, 64))
```
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from impls.layer import GroupedExperts, SharedExperts, combine, make_dispatch, permute
from impls.plan import RoutingPlan
from impls.registry import Preset, build_router, register_preset
from impls.router import Router

__all__ = ["LatentMoELayer"]


class LatentMoELayer(nn.Module):
    """Routed experts in a ``latent_dim`` space between a down and an up projection; router and shared
    experts on the model-width input. ``forward(x)`` returns ``(y, plan)``; add the residual yourself."""

    def __init__(
        self,
        d_model: int,
        latent_dim: int,
        d_hidden: int,
        num_experts: int | None = None,
        router: str | Router = "topk",
        *,
        activation: str = "swiglu",
        num_shared_experts: int = 0,
        d_hidden_shared: int | None = None,
        **router_options: Any,
    ):
        super().__init__()
        if not 0 < latent_dim <= d_model:
            raise ValueError(f"latent_dim must be in (0, d_model={d_model}], got {latent_dim}")
        if isinstance(router, Router):
            if router.d_model != d_model:
                raise ValueError(f"the router routes width {router.d_model}, the layer's input is {d_model}")
            self.router = router
        else:
            self.router = build_router(router, d_model=d_model, num_experts=num_experts, **router_options)
        E = self.router.num_experts
        self.down = nn.Linear(d_model, latent_dim, bias=False)  # fc1_latent
        self.up = nn.Linear(latent_dim, d_model, bias=False)  # fc2_latent
        self.experts = GroupedExperts(E, latent_dim, d_hidden, activation)
        width = d_hidden_shared or d_hidden
        self.shared = (
            SharedExperts(d_model, width * num_shared_experts, activation) if num_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingPlan]:
        lead, D = x.shape[:-1], x.shape[-1]
        h_TD = x.reshape(-1, D)
        plan = self.router(h_TD)
        u_TL = self.down(h_TD)
        d = make_dispatch(plan)
        y_NL = self.experts(permute(u_TL, d), d)
        y_TD = self.up(combine(y_NL, d, plan.weights_TK, u_TL.dtype))
        if self.shared is not None:
            y_TD = y_TD + self.shared(h_TD)
        return y_TD.view(*lead, D), plan


NEMOTRON_3_SUPER = register_preset(
    Preset(
        name="nemotron_3_super",
        router="deepseek",
        options={
            "k": 22,
            "score_func": "sigmoid",
            "normalize": True,
            "routed_scaling_factor": 5.0,
            "aux_free_bias": True,
            "bias_update_rate": 1e-3,
            "balance_counts": "unbiased_topk",
        },
        num_experts=512,
        layer={"activation": "swiglu", "num_shared_experts": 1},
        loss_coefficients={"seq_load_balance": 1e-4},
        papers=("latent-moe",),
        description=(
            "NVIDIA Nemotron 3 Super's LatentMoE router: 512 routed experts, sigmoid top-22 with a selection "
            "bias, renormalized x 5.0, sequence-level balance 1e-4 (experts in a 1024-wide latent of the "
            "4096-wide model: LatentMoELayer)."
        ),
        deviations=(
            "The bias update speed 1e-3 is DeepSeek-V3's; Nemotron's experts use squared ReLU (here "
            "SwiGLU); as an impls.MoELayer router the experts are full-width."
        ),
    )
)
