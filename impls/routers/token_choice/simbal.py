r"""Similarity-preserving routers (SimBal; Omi, Sen, Farhadi 2025): balance through an orthogonal router.

The Switch balance loss pushes every batch towards uniform expert use, whatever the tokens are,
and so also pulls similar tokens apart. SimBal instead keeps the router close to an orthogonal
map, so that the routing preserves the similarity structure of the tokens (two tokens close in
model space get close routing logits) and balance follows from the router's geometry. With the
router weight $R \in \mathbb{R}^{D \times E}$ (logits $x R$), the loss is the entrywise $L_1$
distance of its Gram matrix from the identity,

$$
\mathcal{L}_\text{orth} = \lVert R^\top R - I_E \rVert_1
= \sum_{a, b} \big| (R^\top R)_{ab} - \delta_{ab} \big|,
$$

which pulls the expert directions apart (off-diagonal terms) and each to unit norm (diagonal).
It depends on the router weights only, not on the batch. Routing is the ordinary softmax top-$k$
(`impls.routers.token_choice.topk`), the router is initialized orthogonal (Saxe et al. 2014), and
the plan returns `orthogonality` beside the usual `load_balance` and `z_loss` (the SimBal setting
uses `orthogonality` *instead of* `load_balance`).

## Defaults and what is confirmed

The paper's method section could not be read for this implementation: the loss (a sum, not a
mean, over the $E \times E$ Gram matrix), the orthogonal initialization and the OLMoE-style
setting (32 experts, top-4, softmax) follow the abstract and consistent secondary readings of
its appendix. The loss weight 0.1 and the z-loss weight $10^{-5}$ of the preset are unconfirmed.

**Deviations.** Whether the top-$k$ weights are renormalized is not known; the preset
renormalizes (the router's default). The loss needs $E \le D$ to reach zero (an orthogonal
$R^\top R = I_E$ exists only then); its scale grows with $E^2$, so a weight tuned at $E = 32$
does not carry over to other $E$.

## Usage

```python
import torch, impls

layer = impls.MoELayer(64, 128, router="simbal_olmoe")       # 32 experts, top-4
out, plan = layer(torch.randn(4, 16, 64))
loss = out.pow(2).mean() + plan.aux_loss(layer.loss_coefficients)   # 0.1 * orthogonality + z-loss
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import RouterConfig
from impls.routers.token_choice.topk import TopKConfig, TopKRouter

__all__ = ["SimBalConfig", "SimBalRouter", "orthogonality_loss"]


def orthogonality_loss(weight_ED: torch.Tensor) -> torch.Tensor:
    """``|| W W^T - I ||_1`` for a router weight ``W = R^T`` of shape ``[E, D]`` (float32)."""
    w = weight_ED.float()
    eye = torch.eye(w.shape[0], device=w.device, dtype=w.dtype)
    return (w @ w.T - eye).abs().sum()


@dataclass(frozen=True, kw_only=True)
class SimBalConfig(TopKConfig):
    """Options of ``SimBalRouter``: the top-k router's, plus the initialization.

    Attributes:
        orthogonal_init: initialize the router weight orthogonal (rows orthonormal when ``E <= D``).
    """

    orthogonal_init: bool = True


@register_router
class SimBalRouter(TopKRouter):
    """Softmax top-k routing with SimBal's orthogonality loss ``|| R^T R - I ||_1`` on the router weight.

    Omi, Sen, Farhadi, "Load Balancing Mixture of Experts with Similarity Preserving Routers",
    arXiv 2506.14038 (2025).
    """

    name = "simbal"
    papers = ("similarity-preserving-routers",)
    Config = SimBalConfig
    config: SimBalConfig

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        if self.config.orthogonal_init:
            nn.init.orthogonal_(self.gate.weight)

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        plan = super().route(logits_TE, x_TD, token_mask_T)
        orth = orthogonality_loss(self.gate.weight)
        if token_mask_T is not None:  # a batch of padding only adds nothing (no host sync)
            orth = orth * token_mask_T.any().to(orth.dtype)
        losses = {**plan.losses, "orthogonality": orth}
        return dataclasses.replace(plan, losses=losses)


SIMBAL_OLMOE = register_preset(
    Preset(
        name="simbal_olmoe",
        router="simbal",
        options={"k": 4},
        num_experts=32,
        layer={"activation": "swiglu"},
        loss_coefficients={"orthogonality": 0.1, "z_loss": 1e-5},
        papers=("similarity-preserving-routers",),
        description=(
            "SimBal (Omi et al. 2025, arXiv 2506.14038) in its OLMoE-style setting: 32 experts, top-4 "
            "softmax, orthogonal router init, the orthogonality loss in place of the Switch loss."
        ),
        deviations="Loss weights 0.1 and 1e-5 and the renormalized top-4 weights are unconfirmed.",
    )
)
