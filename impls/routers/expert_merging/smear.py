r"""Per-example expert merging (SMEAR, MEO): average the experts' parameters, then run one expert.

**SMEAR** (Muqeeth, Liu & Raffel, "Soft Merging of Experts with Adaptive Routing", TMLR 2024,
arXiv 2306.03745; official code `r-three/smear`). For an example with token representations
$h_1, \dots, h_L$ the router reads their average and gives one distribution over the $E$ experts;
the example is computed by the single expert whose parameters are the weighted average of all
experts' parameters:

$$
p = \operatorname{softmax}\Big(W_r \operatorname{LN}\big(\tfrac{1}{L}\textstyle\sum_l h_l\big)\Big),
\qquad
y_l = f\big(h_l;\ \textstyle\sum_{e=1}^{E} p_e\, \theta_e\big).
$$

Every expert gets a gradient through the merge (no estimator is needed), and the compute is that of
one expert plus the merge ($E$ times the parameter count, once per example). SMEAR uses no noise
and no balancing loss; its released runs zero each expert's probability with probability 0.1 in
training and renormalize (`expert_dropout`).

**MEO** (He, Fan, Ding, Shen, Zhou & Tao, "Merging Experts into One: Improving Computational
Efficiency of Mixture of Experts", EMNLP 2023, arXiv 2310.09832; official code `Shwai-He/MEO`)
keeps a *sparse* gate: noisy top-$k$ gating (Shazeer et al. 2017, eq. 3-5, as `noisy_topk` here)
on the sequence average selects $k$ experts with softmax weights over the selected ones, and only
those are merged, $\tilde\theta = \sum_{i \in \text{top-}k} g_i \theta_i$, so a sequence costs one
expert instead of $k$. Its losses are Shazeer's `importance` and `load` CV² terms (weight 0.01
each in the official code).

Both produce a `MergePlan` with one group per sequence; `MoELayer(..., router="smear")` builds the
merged expert per sequence and runs it with one batched matmul per projection.

Deviations: the average runs over valid tokens only (the official codes of both average over
padding too); SMEAR's LayerNorm on the router *weights* (`normalize_router_weights`) is not
reproduced (a plain linear gate, $\mathcal N(0, 0.01^2)$ init, after a LayerNorm of the pooled
input); the experts are this package's MLP experts without biases, where MEO merges each linear
layer's weight and bias with its own gate; MEO's "token-level" variant (a per-token bottleneck
adapter added before the merge, in the official code) is not included. Both routers read the
whole sequence, so neither is causal.

## Usage

```python
import torch, impls

layer = impls.MoELayer(d_model=16, d_hidden=32, num_experts=4, router="smear")
x = torch.randn(2, 7, 16)
y, plan = layer(x)
print(plan.weights_BGE.shape)                                # one weight vector per example
meo = impls.MoELayer(d_model=16, d_hidden=32, num_experts=8, router="meo", k=2)
y, plan = meo(x)
print((plan.weights_BGE > 0).sum(-1))                        # 2 experts merged per sequence
loss = plan.aux_loss({"importance": 0.01, "load": 0.01})
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from impls.plan import MergePlan
from impls.registry import Preset, register_preset, register_router
from impls.router import RouterConfig, SequenceRouter, SequenceRouterConfig

__all__ = ["MEO", "SMEAR", "MEOConfig", "MEORouter", "SMEARConfig", "SMEARRouter", "masked_mean_pool"]


def masked_mean_pool(x_BLD: torch.Tensor, token_mask_BL: torch.Tensor) -> torch.Tensor:
    """``[B, D]``: mean of each sequence's valid tokens (zeros for a sequence of padding only)."""
    m = token_mask_BL.to(x_BLD.dtype)[..., None]
    return (x_BLD * m).sum(1) / m.sum(1).clamp_min(1)


@dataclass(frozen=True, kw_only=True)
class SMEARConfig(SequenceRouterConfig):
    """Options of ``SMEARRouter``.

    Attributes:
        pre_norm: LayerNorm the pooled input before the gate (as the official router).
        expert_dropout: in training, zero each expert's probability with this chance, renormalize.
        init_std: standard deviation of the gate's initial weights.
    """

    pre_norm: bool = True
    expert_dropout: float = 0.0
    init_std: float = 1e-2

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.k != 1:
            raise ValueError("SMEAR merges all experts; k does not apply (leave k=1)")
        if not 0 <= self.expert_dropout < 1:
            raise ValueError(f"expert_dropout must be in [0, 1), got {self.expert_dropout}")
        if not (math.isfinite(self.init_std) and self.init_std >= 0):
            raise ValueError(f"init_std must be a finite number >= 0, got {self.init_std}")


@register_router
class SMEARRouter(SequenceRouter):
    """SMEAR (Muqeeth et al., TMLR 2024): one softmax over experts per example, merged parameters."""

    name = "smear"
    papers = ("smear",)
    causal = False
    plan_type = "merge"
    Config = SMEARConfig
    config: SMEARConfig

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        self.norm = nn.LayerNorm(d_model, dtype=torch.float32) if self.config.pre_norm else None
        nn.init.normal_(self.gate.weight, std=self.config.init_std)

    @property
    def max_experts_per_token(self) -> int:
        return self.num_experts

    @property
    def combine_normalization(self) -> float:
        return 1.0

    def pooled_logits(self, pooled_BD: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            pooled_BD = nn.functional.layer_norm(
                pooled_BD,
                (self.d_model,),
                self.norm.weight.float(),
                self.norm.bias.float(),
                self.norm.eps,
            )
        return self.compute_logits(pooled_BD)

    def route_sequences(self, x_BLD: torch.Tensor, token_mask_BL: torch.Tensor) -> MergePlan:
        logits_BE = self.pooled_logits(masked_mean_pool(x_BLD, token_mask_BL))
        probs_BE = logits_BE.softmax(-1)
        weights_BE = probs_BE
        p = self.config.expert_dropout
        if self.training and p > 0:
            keep = torch.rand_like(probs_BE) >= p
            kept = probs_BE * keep
            # all experts dropped: fall back to the undropped distribution
            weights_BE = torch.where(kept.sum(-1, keepdim=True) > 0, kept, probs_BE)
            weights_BE = weights_BE / weights_BE.sum(-1, keepdim=True)
        return MergePlan.per_sequence(weights_BE, probs_BE, logits_BE, token_mask_BL)


@dataclass(frozen=True, kw_only=True)
class MEOConfig(SequenceRouterConfig):
    """Options of ``MEORouter``.

    Attributes:
        k: experts merged per sequence (>= 2, as noisy top-k gating needs).
        noisy: add the trainable gate noise in training.
        noise_epsilon: floor on the noise scale.
    """

    k: int = 2
    noisy: bool = True
    noise_epsilon: float = 1e-2

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.k < 2:
            raise ValueError("MEO's noisy top-k gate needs k >= 2 (with k=1 the merged weight is always 1)")


@register_router
class MEORouter(SequenceRouter):
    """MEO (He et al., EMNLP 2023): noisy top-k on the sequence average, the k experts merged."""

    name = "meo"
    papers = ("meo",)
    causal = False
    plan_type = "merge"
    Config = MEOConfig
    config: MEOConfig

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        from impls.routers.token_choice.noisy_topk import NoisyTopKRouter

        cfg = self.config
        self.gate = None
        # the gate is Shazeer's noisy top-k, applied to one pooled vector per sequence
        self.pooled_gate = NoisyTopKRouter(
            d_model, num_experts, k=cfg.k, noisy=cfg.noisy, noise_epsilon=cfg.noise_epsilon
        )

    @property
    def max_experts_per_token(self) -> int:
        return self.config.k

    @property
    def combine_normalization(self) -> float:
        return 1.0

    def route_sequences(self, x_BLD: torch.Tensor, token_mask_BL: torch.Tensor) -> MergePlan:
        L = x_BLD.shape[1]
        pooled_BD = masked_mean_pool(x_BLD, token_mask_BL)
        self.pooled_gate.train(self.training)
        plan = self.pooled_gate(pooled_BD, token_mask_BL.any(-1) if L else None)
        weights_BE = torch.zeros_like(plan.scores_TE).scatter(1, plan.expert_ids_TK, plan.weights_TK)
        return MergePlan.per_sequence(weights_BE, plan.scores_TE, plan.logits_TE, token_mask_BL, plan.losses)


SMEAR = register_preset(
    Preset(
        name="smear_t5",
        router="smear",
        options={"expert_dropout": 0.1},
        num_experts=8,
        papers=("smear",),
        description=(
            "SMEAR on T5-v1.1-base adapters (Muqeeth et al., TMLR 2024; official GLUE config): 8 experts "
            "per adapter site, expert dropout 0.1, no balancing loss."
        ),
        deviations="Masked average; plain linear gate after a LayerNorm of the pooled input.",
    )
)

MEO = register_preset(
    Preset(
        name="meo_bert",
        router="meo",
        options={"k": 4},
        num_experts=8,
        loss_coefficients={"importance": 0.01, "load": 0.01},
        papers=("meo",),
        description=(
            "MEO (He et al., EMNLP 2023; official `run_glue.py` defaults): 8 experts, the top 4 merged per "
            "sequence, importance and load losses weighted 0.01."
        ),
        deviations="Masked average; no expert biases; the token-level adapter variant is not included.",
    )
)
