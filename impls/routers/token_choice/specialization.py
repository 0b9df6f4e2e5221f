r"""Advancing expert specialization (Guo et al. 2025): orthogonality and variance losses besides balance.

The balance loss pushes routing towards uniform, which makes experts overlap (they see similar
tokens) and routing flat. Guo et al. add two objectives that keep balance while pulling experts
apart:

* an **expert orthogonality loss** on the outputs of the $K$ experts a token selected: each
  output's squared projection onto the span of the token's other expert outputs,
  $\mathcal{L}_o = \frac{1}{KT}\sum_t \sum_{i \in \mathcal{T}_t}
  \lVert \operatorname{Proj}_{S_{t,i}}\, y_{t,i} \rVert^2$ with
  $S_{t,i} = \operatorname{span}\{y_{t,j} : j \in \mathcal{T}_t, j \ne i\}$
  (zero when the experts a token uses produce mutually orthogonal outputs);
* a **routing variance loss**, the variance of each token's routing distribution over the
  experts, to be *maximized* (sharper, more decisive routing):
  $\mathcal{L}_v = \frac{1}{T}\sum_t \operatorname{Var}_e(p_{t,e})$.

The total objective is $\mathcal{L}_\text{task} + \alpha \mathcal{L}_\text{aux} + \beta \mathcal{L}_o
- \gamma \mathcal{L}_v$. The router (softmax top-$k$, DeepSeek's sequence-level balance loss)
returns `variance` as $-\mathcal{L}_v$, so that every coefficient is positive; the
orthogonality loss needs the experts' outputs, so it comes from the layer:
`specialization_forward(layer, x)` runs the layer once and returns its output, plan and
$\mathcal{L}_o$ (`expert_orthogonality_loss` on any ``[T, K, D]`` slot outputs).

## Defaults and what is confirmed

From the official code (DeepSeek-MoE, DeepSeek-V2-Lite and Moonlight fine-tuning, softmax top-6
of 64 routed experts with 2 shared): the variance is the unbiased variance over all experts of the
pre-top-$k$ softmax, averaged over tokens, and subtracted; the orthogonality term projects each
selected expert's raw output (before gate weighting) onto the others, Gram-Schmidt style, and
divides by $K T$; the balance loss is DeepSeek's sequence-level one with $\alpha = 0.001$. The
paper's text beyond its abstract was not read here: its equation numbers and its own $\beta$,
$\gamma$ are not cited.

**Deviations.** The released code's orthogonality loss regroups the expert-ordered outputs as if
they were token-ordered (so a "token's experts" are mostly one expert's outputs on different
tokens); this module groups the outputs by token, as the method describes. The code calibrates
its weights from the first batch ($10^{\operatorname{round}(\log_{10}(\text{target}/\text{initial}))}$);
the preset uses fixed weights (the code's targets 0.001 and 0.0001).

## Usage

```python
import torch, impls
from impls.routers.token_choice.specialization import specialization_forward

layer = impls.MoELayer(64, 128, router="expert_specialization_deepseek", num_experts=16, k=4)
out, plan, ortho = specialization_forward(layer, torch.randn(2, 10, 64))
loss = out.pow(2).mean() + plan.aux_loss(layer.loss_coefficients) + 1e-4 * ortho
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from impls.functional import masked_mean
from impls.layer import _kept_rows, combine
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.routers.token_choice.deepseek import DeepSeekConfig, DeepSeekRouter

__all__ = [
    "SpecializationConfig",
    "SpecializationRouter",
    "expert_orthogonality_loss",
    "routing_variance",
    "specialization_forward",
]


def routing_variance(probs_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_t Var_e(p_t)`` (unbiased over the experts), over the valid tokens."""
    correction = 1 if probs_TE.shape[-1] > 1 else 0  # one expert: variance 0, not NaN
    return masked_mean(probs_TE.float().var(dim=-1, correction=correction), token_mask_T)


def expert_orthogonality_loss(slot_outputs_TKD: torch.Tensor, keep_TK: torch.Tensor) -> torch.Tensor:
    """``(1/KT) sum_t sum_i ||Proj_{span of the token's other kept outputs} y_ti||^2``.

    Projections by the pseudo-inverse of the others' Gram matrix (exact for dependent outputs
    too); unkept slots count as zero vectors. Loops over the ``K`` slots only.
    """
    T, K, _ = slot_outputs_TKD.shape
    y = slot_outputs_TKD.float() * keep_TK[..., None]
    if K < 2 or T == 0:
        return y.sum() * 0.0
    gram_TKK = y @ y.transpose(1, 2)
    total = y.new_zeros(())
    idx = torch.arange(K, device=y.device)
    for i in range(K):
        others = idx[idx != i]
        g_oo = gram_TKK[:, others][:, :, others]  # [T, K-1, K-1]
        g_oi = gram_TKK[:, others, i]  # [T, K-1]
        coef = torch.linalg.pinv(g_oo, hermitian=True) @ g_oi[..., None]
        total = total + (g_oi[..., None] * coef).sum()  # ||proj||^2 = g^T G^+ g
    return total / (K * T)


def specialization_forward(layer, x: torch.Tensor) -> tuple[torch.Tensor, RoutingPlan, torch.Tensor]:
    """Run an ``impls.MoELayer`` once: ``(output, plan, orthogonality loss of its routed experts)``."""
    lead, D = x.shape[:-1], x.shape[-1]
    x_TD = x.reshape(-1, D)
    plan = layer.route(x_TD)
    y_ND, d = layer.expert_outputs(x_TD, plan)
    out_TD = layer._add_shared(combine(y_ND, d, plan.weights_TK, x_TD.dtype), x_TD, None)
    ortho = expert_orthogonality_loss(_kept_rows(y_ND, d), d.keep_TK)
    return out_TD.view(*lead, D), plan, ortho


@dataclass(frozen=True, kw_only=True)
class SpecializationConfig(DeepSeekConfig):
    """Options of ``SpecializationRouter``: DeepSeek's (softmax top-k by default)."""


@register_router
class SpecializationRouter(DeepSeekRouter):
    """DeepSeek-style top-k with the routing-variance loss (returned negated, to be minimized).

    Guo, Lu, Nan, Chu, Zhuang, Yang, Che, Cao, Leng, Cui, Jiang, "Advancing Expert Specialization
    for Better MoE", arXiv 2505.22323 (2025).
    """

    name = "expert_specialization"
    papers = ("advancing-expert-specialization",)
    Config = SpecializationConfig

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        plan = super().route(logits_TE, x_TD, token_mask_T)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        losses = {**plan.losses, "variance": -routing_variance(probs_TE, token_mask_T)}
        return dataclasses.replace(plan, losses=losses)


EXPERT_SPECIALIZATION_DEEPSEEK = register_preset(
    Preset(
        name="expert_specialization_deepseek",
        router="expert_specialization",
        options={"k": 6},
        num_experts=64,
        layer={"activation": "swiglu", "num_shared_experts": 2},
        loss_coefficients={"seq_load_balance": 0.001, "variance": 0.001},
        papers=("advancing-expert-specialization",),
        description=(
            "Guo et al. 2025 (arXiv 2505.22323) on DeepSeek-V2-Lite / Moonlight: 2 shared + 64 routed "
            "experts, softmax top-6, sequence-level balance 0.001, routing variance maximized with weight "
            "0.001 (and the orthogonality loss, 0.0001, from specialization_forward)."
        ),
        deviations="Fixed weights (the code's targets) instead of the code's first-batch calibration.",
    )
)
