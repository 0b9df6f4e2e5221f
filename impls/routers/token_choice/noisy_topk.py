r"""Noisy top-k gating with importance and load losses (Shazeer 2017), V-MoE with BPR, M6-T prototyping.

**Sparsely-gated MoE** (Shazeer et al. 2017, eq. 3-5). Trainable, input-dependent Gaussian noise
is added to the gate logits; the $k$ largest survive and a softmax over them gives the weights:

$$
H(x)_i = (x W_g)_i + \epsilon_i \cdot \operatorname{softplus}\big((x W_\text{noise})_i\big), \quad
\epsilon_i \sim \mathcal{N}(0, 1), \qquad
G(x) = \operatorname{softmax}\big(\operatorname{KeepTopK}(H(x), k)\big).
$$

Two auxiliary losses (eq. 6-7 and Appendix A, eq. 8-11), both squared coefficients of variation
over experts:

$$
\text{Importance}(X) = \sum_{x \in X} G(x), \qquad
\mathcal{L}_\text{importance} = \operatorname{CV}(\text{Importance}(X))^2,
$$

$$
P(x, i) = \Phi\!\left(\frac{(x W_g)_i - \operatorname{kth\_excluding}(H(x), k, i)}
    {\operatorname{softplus}((x W_\text{noise})_i)}\right), \qquad
\text{Load}(X)_i = \sum_{x \in X} P(x, i), \qquad
\mathcal{L}_\text{load} = \operatorname{CV}(\text{Load}(X))^2,
$$

where $\operatorname{kth\_excluding}(v, k, i)$ is the $k$-th largest entry of $v$ other than $v_i$
and $\Phi$ the standard normal CDF: $P(x, i)$ is the probability that expert $i$ would still be
selected if only its own noise were redrawn, a smooth estimate of its load.

**V-MoE** (Riquelme et al. 2021) routes on $\operatorname{softmax}(x W + \epsilon)$ with
$\epsilon \sim \mathcal{N}(0, \sigma^2)$, $\sigma = 1/E$ (training only); the combine weights are
those probabilities (not renormalized). Its importance loss uses the noise-free softmax, its
load loss the probability $1 - \Phi\big((\theta(x) - (xW)_i)/\sigma\big)$ that expert $i$ clears
the $k$-th largest noisy logit $\theta(x)$. **Batch-prioritized routing (BPR)** fills expert
buffers in order of each token's largest routing weight $\max_i p_i(x)$ rather than by position,
so that when capacity is short the least confident tokens are the ones dropped
(`drop_policy="probability"`; this makes the router non-causal).

**M6-T expert prototyping** (Yang et al. 2021) splits the $E$ experts into $k$ prototypes of
$E/k$ and routes top-1 inside each (softmax within the prototype), summing the $k$ outputs:
"$k$ top-1" instead of one top-$k$.

Losses are returned unweighted: `importance` and `load` (Shazeer, V-MoE), `load_balance`
(Switch form, per prototype for M6-T). Without noise (evaluation) `load` is the CV² of the
selected counts, so the same loss names exist in both modes.

## Defaults and what is confirmed

* `noisy_topk` / `sparsely_gated_moe`: gate and noise weights start at zero (paper, Appendix A);
  `noise_epsilon = 0.01` is tensor2tensor's floor on the noise scale (not in the paper). The
  preset's $k = 4$, $E = 32$ and loss weights $w_\text{importance} = w_\text{load} = 0.1$ follow
  the paper's language-model setup as reported by secondary sources (unverified against the PDF).
* `vmoe_topk` / `vmoe`: $\sigma = 1/E$, the loss forms and BPR are confirmed from the V-MoE
  code; $E = 32$, $k = 2$, capacity ratio 1.05 and the total weight 0.01 split evenly between the
  two losses are unverified.
* `expert_prototyping` / `m6_t`: the $k$ top-1 structure is from the paper's abstract; softmax
  within a prototype and the per-prototype Switch loss are assumptions.

## Usage

```python
import torch, impls

router = impls.build_router("noisy_topk", d_model=32, num_experts=8, k=2)
router.train()
plan = router(torch.randn(64, 32))
print(plan.losses["importance"], plan.losses["load"])

bpr = impls.build_router("vmoe", d_model=32, num_experts=8, capacity_factor=0.5)
bpr.train()
plan = bpr(torch.randn(64, 32))
print(plan.fraction_dropped)                   # the least confident tokens were dropped

proto = impls.build_router("m6_t", d_model=32, num_experts=8)   # 2 prototypes of 4 experts
print(proto(torch.randn(5, 32)).expert_ids_TK)   # column j holds an expert of prototype j
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from impls.functional import cv_squared, expert_counts, masked_mean, topk
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig

__all__ = [
    "NoisyTopKConfig",
    "NoisyTopKRouter",
    "PrototypeConfig",
    "PrototypeRouter",
    "VMoEConfig",
    "VMoERouter",
    "normal_cdf",
]


def normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF ``Phi(z)``."""
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def _masked_sum(x_TE: torch.Tensor, token_mask_T: torch.Tensor | None) -> torch.Tensor:
    return x_TE.sum(0) if token_mask_T is None else (x_TE * token_mask_T[:, None]).sum(0)


# ---------------------------------------------------------------------------------- Shazeer 2017


@dataclass(frozen=True, kw_only=True)
class NoisyTopKConfig(RouterConfig):
    """Options of ``NoisyTopKRouter``.

    Attributes:
        k: experts per token (>= 2: with k = 1 the single weight is the constant 1).
        noisy: add the trainable noise in training.
        noise_epsilon: floor added to the noise scale ``softplus(x W_noise)``.
        zero_init: start ``W_g`` and ``W_noise`` at zero (the paper's initialization).
    """

    k: int = 2
    noisy: bool = True
    noise_epsilon: float = 1e-2
    zero_init: bool = True

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.k < 2:
            raise ValueError("noisy top-k gating needs k >= 2: with k=1 the softmax weight is always 1")
        if self.noise_epsilon < 0:
            raise ValueError(f"noise_epsilon must be >= 0, got {self.noise_epsilon}")


@register_router
class NoisyTopKRouter(Router):
    """Noisy top-k gating with importance and load losses.

    Shazeer, Mirhoseini, Maziarz, Davis, Le, Hinton, Dean, "Outrageously Large Neural Networks:
    The Sparsely-Gated Mixture-of-Experts Layer", 2017, arXiv 1701.06538 (eq. 3-7; Appendix A
    eq. 8-11 for the load estimator).
    """

    name = "noisy_topk"
    papers = ("shazeer-2017",)
    causal = True
    Config = NoisyTopKConfig

    def __init__(self, d_model: int, num_experts: int, config=None, **options):
        super().__init__(d_model, num_experts, config, **options)
        self.noise = nn.Linear(d_model, num_experts, bias=False, dtype=torch.float32)
        if self.config.zero_init:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.noise.weight)

    @property
    def combine_normalization(self) -> float:
        return 1.0

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        cfg, E, k = self.config, self.num_experts, self.config.k
        noisy = self.training and cfg.noisy
        if noisy:
            std_TE = F.softplus(F.linear(x_TD, self.noise.weight.float())) + cfg.noise_epsilon
            if token_mask_T is not None:  # padding, or a non-finite input: keep its row finite
                std_TE = torch.where(token_mask_T[:, None], std_TE, torch.ones_like(std_TE))
            h_TE = logits_TE + torch.randn_like(logits_TE) * std_TE
        else:
            h_TE = logits_TE
        top_v, top_i = topk(h_TE, min(k + 1, E))
        ids_TK, w_TK = top_i[:, :k], torch.softmax(top_v[:, :k], dim=-1)
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        gates_TE = torch.zeros_like(h_TE).scatter(1, ids_TK, w_TK)
        if noisy and k < E:
            chosen_TE = torch.zeros_like(h_TE, dtype=torch.bool).scatter(1, ids_TK, True)
            threshold_TE = torch.where(chosen_TE, top_v[:, k : k + 1], top_v[:, k - 1 : k])
            load_E = _masked_sum(normal_cdf((logits_TE - threshold_TE) / std_TE), token_mask_T)
        else:
            load_E = expert_counts(ids_TK, E, token_mask_T)
        importance_E = _masked_sum(gates_TE, token_mask_T)
        losses = {"importance": cv_squared(importance_E), "load": cv_squared(load_E)}
        scores_TE = torch.softmax(h_TE, dim=-1)
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        return RoutingPlan(
            ids_TK,
            w_TK,
            keep_TK,
            scores_TE,
            logits_TE,
            losses,
            token_mask_T,
            info={"noisy": noisy, "importance_E": importance_E, "load_E": load_E},
        )


# ---------------------------------------------------------------------------------- V-MoE


@dataclass(frozen=True, kw_only=True)
class VMoEConfig(RouterConfig):
    """Options of ``VMoERouter``.

    Attributes:
        k: experts per token.
        noise_std: logit noise scale in units of ``1/E`` (V-MoE's ``noise_std``; std = noise_std/E).
    """

    k: int = 2
    noise_std: float = 1.0

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


@register_router
class VMoERouter(Router):
    """V-MoE noisy top-k softmax router with optional batch-prioritized routing.

    Riquelme, Puigcerver, Mustafa, Neumann, Jenatton, Susano Pinto, Keysers, Houlsby, "Scaling
    Vision with Sparse Mixture of Experts", 2021, arXiv 2106.05974 (Sec. 2.1 routing, Sec. 4 BPR,
    Appendix A auxiliary losses).
    """

    name = "vmoe_topk"
    papers = ("v-moe",)
    causal = True
    Config = VMoEConfig

    @property
    def combine_normalization(self) -> str:
        return "at_most_one"

    def drop_priority(self, plan: RoutingPlan) -> torch.Tensor:
        """BPR: every slot of a token has the token's largest routing weight as priority."""
        top_T = plan.scores_TE.max(-1).values
        return top_T[:, None].expand_as(plan.weights_TK)

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        cfg, E, k = self.config, self.num_experts, self.config.k
        clean_TE = torch.softmax(logits_TE, dim=-1)
        noisy = self.training and cfg.noise_std > 0
        if noisy:
            sigma = cfg.noise_std / E
            noisy_logits_TE = logits_TE + sigma * torch.randn_like(logits_TE)
            probs_TE = torch.softmax(noisy_logits_TE, dim=-1)
        else:
            probs_TE = clean_TE
        w_TK, ids_TK = topk(probs_TE, k)
        if noisy:
            threshold_T1 = torch.topk(noisy_logits_TE, k, dim=-1).values[:, k - 1 : k]
            p_TE = 1.0 - normal_cdf((threshold_T1 - logits_TE) / sigma)
            load_E = masked_mean(p_TE, token_mask_T)
        else:
            load_E = expert_counts(ids_TK, E, token_mask_T)
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        losses = {"importance": cv_squared(_masked_sum(clean_TE, token_mask_T)), "load": cv_squared(load_E)}
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        info = {"noisy": noisy, "load_E": load_E}
        return RoutingPlan(ids_TK, w_TK, keep_TK, probs_TE, logits_TE, losses, token_mask_T, info=info)


# ---------------------------------------------------------------------------------- M6-T


@dataclass(frozen=True, kw_only=True)
class PrototypeConfig(RouterConfig):
    """Options of ``PrototypeRouter``: ``k`` is the number of prototypes (one expert from each)."""

    k: int = 2

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if num_experts % self.k:
            raise ValueError(f"num_experts={num_experts} must be divisible by k={self.k} prototypes")


@register_router
class PrototypeRouter(Router):
    """Expert prototyping: ``k`` prototypes of ``E/k`` experts, top-1 routing inside each.

    Yang et al., "M6-T: Exploring Sparse Expert Models and Beyond", 2021, arXiv 2105.15082
    (expert prototyping; section and equation numbers not checked).
    """

    name = "expert_prototyping"
    papers = ("m6-t",)
    causal = True
    Config = PrototypeConfig

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        T, E, k = logits_TE.shape[0], self.num_experts, self.config.k
        m = E // k
        probs_TKM = torch.softmax(logits_TE.view(T, k, m), dim=-1)
        w_TK, local_TK = probs_TKM.max(-1)
        ids_TK = local_TK + torch.arange(k, device=logits_TE.device) * m
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        # Switch loss inside every prototype, averaged over prototypes (balanced -> 1)
        f_KM = expert_counts(ids_TK, E, token_mask_T).view(k, m)
        f_KM = f_KM / f_KM.sum(-1, keepdim=True).clamp_min(1)
        P_KM = masked_mean(probs_TKM.reshape(T, E), token_mask_T).view(k, m)
        losses = {"load_balance": (m * (f_KM * P_KM).sum(-1)).mean()}
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        scores_TE = probs_TKM.reshape(T, E)
        return RoutingPlan(ids_TK, w_TK, keep_TK, scores_TE, logits_TE, losses, token_mask_T)


SPARSELY_GATED_MOE = register_preset(
    Preset(
        name="sparsely_gated_moe",
        router="noisy_topk",
        options={"k": 4},
        num_experts=32,
        loss_coefficients={"importance": 0.1, "load": 0.1},
        papers=("shazeer-2017",),
        description=(
            "Sparsely-gated MoE (Shazeer et al. 2017, arXiv 1701.06538): noisy top-4 gating, importance and "
            "load losses."
        ),
        deviations=(
            "k=4, E=32 and both loss weights 0.1 come from secondary summaries of the paper (unverified)."
        ),
    )
)
VMOE = register_preset(
    Preset(
        name="vmoe",
        router="vmoe_topk",
        options={"k": 2, "noise_std": 1.0, "capacity_factor": 1.05, "drop_policy": "probability"},
        num_experts=32,
        loss_coefficients={"importance": 0.005, "load": 0.005},
        papers=("v-moe",),
        description=(
            "V-MoE (Riquelme et al. 2021, arXiv 2106.05974): noisy top-2 softmax, capacity ratio 1.05, "
            "batch-prioritized routing."
        ),
        deviations="E=32, capacity 1.05 and loss weights (0.01 split over the two losses) are unverified.",
    )
)
M6_T = register_preset(
    Preset(
        name="m6_t",
        router="expert_prototyping",
        options={"k": 2},
        loss_coefficients={"load_balance": 0.01},
        papers=("m6-t",),
        description=(
            "M6-T expert prototyping (Yang et al. 2021, arXiv 2105.15082): 2 prototypes, top-1 in each."
        ),
        deviations=(
            "Softmax within a prototype, the per-prototype Switch loss and its weight are assumptions."
        ),
    )
)
