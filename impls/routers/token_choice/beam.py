r"""BEAM (2026): binary expert activation masks make top-K routing dynamic.

BEAM keeps a trained model's top-$K$ router and its balance loss and adds, per layer, a **mask
router** that decides for each of a token's $K$ candidates whether it is computed at all:

$$
\hat m = \sigma(W_m x), \qquad m = \mathbb{1}\{\hat m \ge \tfrac12\} \;\; (\text{straight-through:}
\; m = \hat m + \operatorname{sg}(\mathbb{1}\{\hat m \ge \tfrac12\} - \hat m)), \qquad
\hat g_i = g_i\, m_i \;\; (i \in \operatorname{TopK}),
$$

so a token keeps anywhere from $0$ to $K$ of its experts. $W_m$ starts at zero: $\hat m = 1/2$
maps to $m = 1$, so training starts exactly at the original top-$K$ model. A regularizer on the
mask probabilities of the candidates, $\mathcal{L}_\text{mask} = \operatorname{mean}_{t, i \in
\operatorname{TopK}} \hat m_{t,i}$ (`mask_sparsity`), pushes masks off; the total loss is
$\mathcal{L}_\text{LM} + \alpha \mathcal{L}_\text{bal} + \beta \mathcal{L}_\text{mask}$.

In training every candidate is computed (a masked one has weight 0 but its mask still needs the
gradient of its output); in evaluation masked candidates are dropped from the plan (``keep`` is
False), which is where the compute is saved. The candidates and their weights $g$ are those of the
top-$k$ router (`impls.routers.token_choice.topk`); the weights are not renormalized after masking.

## Defaults and what is confirmed

The paper's body could not be read for this implementation: the mask router (one zero-initialized
linear layer per MoE layer, sigmoid, threshold 1/2, identity straight-through estimator), the
mask-probability regularizer and the unrenormalized masked weights follow its abstract and
consistent secondary summaries. The weight $\beta$ is not published; the arena uses 0.01.

**Deviations.** Whether the mask router has a bias is not known (none here).

## Usage

```python
import torch, impls

router = impls.build_router("beam", d_model=32, num_experts=8, k=2)
plan = router(torch.randn(16, 32))
loss = 0.01 * plan.losses["load_balance"] + 0.01 * plan.losses["mask_sparsity"]
print(router.eval()(torch.randn(16, 32)).keep_TK.sum(-1))    # 0..2 experts per token
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from impls.functional import masked_mean
from impls.plan import RoutingPlan
from impls.registry import register_router
from impls.router import RouterConfig
from impls.routers.token_choice.topk import TopKConfig, TopKRouter

__all__ = ["BEAMConfig", "BEAMRouter"]


@dataclass(frozen=True, kw_only=True)
class BEAMConfig(TopKConfig):
    """Options of ``BEAMRouter``: the top-k router's (its candidates), plus the mask threshold.

    Attributes:
        mask_threshold: a candidate is kept where ``sigmoid(W_m x) >= mask_threshold`` (1/2).
    """

    mask_threshold: float = 0.5

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if not 0 < self.mask_threshold < 1:
            raise ValueError(f"mask_threshold must be in (0, 1), got {self.mask_threshold}")


@register_router
class BEAMRouter(TopKRouter):
    """Top-k candidates with a learned, straight-through binary mask per (token, candidate).

    "BEAM: Binary Expert Activation Masking for Dynamic Routing in MoE", arXiv 2605.14438 (2026).
    """

    name = "beam"
    papers = ("beam",)
    Config = BEAMConfig
    config: BEAMConfig

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        self.mask_gate = nn.Linear(d_model, num_experts, bias=False, dtype=torch.float32)  # W_m
        nn.init.zeros_(self.mask_gate.weight)

    @property
    def combine_normalization(self) -> None:
        return None  # masked candidates weigh 0; the rest keep the top-k weights

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        plan = super().route(logits_TE, x_TD, token_mask_T)
        m_hat_TE = torch.sigmoid(nn.functional.linear(x_TD.float(), self.mask_gate.weight.float()))
        m_hat_TE = torch.where(torch.isfinite(m_hat_TE), m_hat_TE, torch.ones_like(m_hat_TE))
        m_hat_TK = m_hat_TE.gather(1, plan.expert_ids_TK)
        hard_TK = (m_hat_TK >= self.config.mask_threshold).to(m_hat_TK.dtype)
        m_TK = m_hat_TK + (hard_TK - m_hat_TK).detach()  # straight-through
        w_TK = plan.weights_TK * m_TK
        keep_TK = plan.keep_TK if self.training else plan.keep_TK & hard_TK.bool()
        sparsity = masked_mean(m_hat_TK.mean(-1), token_mask_T)
        losses = {**plan.losses, "mask_sparsity": sparsity}
        info = {**plan.info, "active_fraction": masked_mean(hard_TK.mean(-1), token_mask_T)}
        return dataclasses.replace(plan, weights_TK=w_TK, keep_TK=keep_TK, losses=losses, info=info)
