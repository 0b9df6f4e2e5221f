r"""Latent Prototype Routing (Yang 2025): routing as clustering tokens against learned prototypes.

LPR encodes each token into a small latent space and routes it to the experts whose learned
**prototypes** it is most similar to; balance comes from the geometry of that space rather than
from a usage penalty. With $x_t \in \mathbb{R}^h$, a Gaussian encoder and $E$ prototypes
$P \in \mathbb{R}^{E \times d}$:

$$
[\mu_t, \log\sigma_t^2] = W\,\operatorname{SiLU}(\operatorname{LN}(x_t)) + b, \qquad
s_{t,i} = \cos(\mu_t, P_i), \qquad
\mathcal{T}_t = \operatorname{TopK}(s_t), \qquad
g_{t,i} = \operatorname{softmax}_{j \in \mathcal{T}_t}(s_{t,j})_i .
$$

Routing reads the mean $\mu$ (deterministic); the sample $z = \mu + \epsilon \sigma$ enters only the
alignment target. Three regularizers (per layer) shape the space:

* KL to the standard normal,
  $\mathcal{L}_\text{KL} = \frac1T\sum_t -\tfrac12 \sum_j
  (1 + \log\sigma^2_{tj} - \mu^2_{tj} - \sigma^2_{tj})$;
* diversity, $\mathcal{L}_\text{div} = \operatorname{MSE}(\bar\mu \bar\mu^\top, I_T) +
  \operatorname{MSE}(\bar P \bar P^\top, I_E)$ with rows L2-normalized (tokens spread out,
  prototypes pushed apart);
* alignment, $\mathcal{L}_\text{align} = \operatorname{mean}|P - \operatorname{sg}(R^\top z)|$ with
  $R = \operatorname{softmax}$ over the experts of the top-$k$ scores (zeros elsewhere), pulling
  each prototype towards the latents routed to it.

The plan returns `lpr` $= w_\text{div}\mathcal{L}_\text{div} + w_\text{KL}\mathcal{L}_\text{KL} +
w_\text{align}\mathcal{L}_\text{align}$ and each term (`lpr_diversity`, `lpr_kl`, `lpr_align`); no
Switch loss. LPR also adds an *aligner* residual to the experts' input,
$x'_t = x_t + W_a(\operatorname{softmax}(s_t) P)$: `router.aligned_input(x, plan)` gives $x'$ for a
caller that wants it (`impls.MoELayer` feeds its experts $x$).

## Defaults and what is confirmed

From the official code (`TokenDistributionRouter`, cosine path) and its shipped configurations:
latent dimension 16, 128 experts, top-8, randomly initialized prototypes, diversity weight 1,
KL weight 0.01, alignment weight 0.1 (Qwen3-MoE) or 0.05 (Mixtral, DeepSeek-V3), the sum weighted
0.01 against the LM loss, no Switch loss. The paper's text beyond its abstract was not read here
(no equation numbers are cited).

**Deviations.** The released alignment target $R^\top z$ is a *sum* over the batch's tokens (its
scale grows with $T$); here it is the $R$-weighted *mean* (`align_target="mean"`, a true
centroid; `"sum"` gives the released form). The token-diversity term builds a $T \times T$ Gram
matrix, $O(T^2)$ memory; `token_diversity=False` drops it. The aligner residual is not applied
inside `impls.MoELayer`.

## Usage

```python
import torch, impls

layer = impls.MoELayer(64, 128, router="lpr_qwen3", num_experts=32, k=4)
out, plan = layer(torch.randn(2, 16, 64))
loss = out.pow(2).mean() + plan.aux_loss(layer.loss_coefficients)   # 0.01 * lpr
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from impls.functional import masked_mean, topk
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig

__all__ = ["LPRConfig", "LPRRouter", "gram_to_identity"]


def gram_to_identity(rows_ND: torch.Tensor, valid_N: torch.Tensor | None = None) -> torch.Tensor:
    """``MSE(N(A) N(A)^T, I)``, rows L2-normalized: the mean over the entries between valid rows."""
    a = nn.functional.normalize(rows_ND.float(), dim=-1)
    n = a.shape[0]
    sq = (a @ a.T - torch.eye(n, device=a.device)) ** 2
    if valid_N is None:
        return sq.mean() if n else rows_ND.sum() * 0.0
    v = valid_N.float()
    return (sq * v[:, None] * v[None, :]).sum() / (v.sum() ** 2).clamp_min(1)


@dataclass(frozen=True, kw_only=True)
class LPRConfig(RouterConfig):
    """Options of ``LPRRouter``.

    Attributes:
        k: experts per token (2 by default, as the other top-k routers; the presets use the paper's 8).
        latent_dim: ``d``, the latent space's dimension.
        diversity_weight, kl_weight, align_weight: the terms' weights inside ``lpr``.
        token_diversity: include the ``T x T`` token-diversity term.
        align_target: ``"mean"`` (the weighted centroid) or ``"sum"`` (the released code's form).
    """

    k: int = 2
    latent_dim: int = 16
    diversity_weight: float = 1.0
    kl_weight: float = 0.01
    align_weight: float = 0.05
    token_diversity: bool = True
    align_target: Literal["mean", "sum"] = "mean"

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if not isinstance(self.latent_dim, int) or self.latent_dim < 1:
            raise ValueError(f"latent_dim must be an int >= 1, got {self.latent_dim!r}")
        for name in ("diversity_weight", "kl_weight", "align_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.align_target not in ("mean", "sum"):
            raise ValueError(f"align_target must be 'mean' or 'sum', got {self.align_target!r}")
        if self.router_bias:
            raise ValueError("LPR has no linear gate; router_bias does not apply")


@register_router
class LPRRouter(Router):
    """Cosine routing of a Gaussian latent against learned prototypes, with KL, diversity and alignment.

    Yang, "Latent Prototype Routing: Achieving Near-Perfect Load Balancing in Mixture-of-Experts",
    arXiv 2506.21328 (2025).
    """

    name = "lpr"
    papers = ("latent-prototype-routing",)
    causal = True  # the routing is per token (only the token-diversity loss couples the batch)
    Config = LPRConfig
    config: LPRConfig

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        d = self.config.latent_dim
        self.gate = None
        self.norm = nn.LayerNorm(d_model, dtype=torch.float32)
        self.encoder = nn.Linear(d_model, 2 * d, dtype=torch.float32)
        self.prototypes = nn.Parameter(torch.randn(num_experts, d, dtype=torch.float32))
        self.aligner = nn.Linear(d, d_model, dtype=torch.float32)

    @property
    def combine_normalization(self) -> float:
        return 1.0

    def encode(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, log_var)``, each ``[T, d]`` (float32)."""
        h = nn.functional.silu(
            nn.functional.layer_norm(
                x_TD.float(), (self.d_model,), self.norm.weight.float(), self.norm.bias.float(), self.norm.eps
            )
        )
        mu, log_var = nn.functional.linear(h, self.encoder.weight.float(), self.encoder.bias.float()).chunk(
            2, -1
        )
        return mu, log_var

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``[T, E]`` cosine similarities of the latent means to the prototypes."""
        cached, self._latent = getattr(self, "_latent", None), None
        mu, log_var = cached[1:] if cached is not None and cached[0] is x_TD else self.encode(x_TD)
        self._latent = (x_TD, mu, log_var)  # route() of the same call reuses the encoding
        return (
            nn.functional.normalize(mu, dim=-1, eps=1e-8)
            @ nn.functional.normalize(self.prototypes.float(), dim=-1, eps=1e-8).T
        )

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        cfg = self.config
        s_TE = logits_TE
        top_TK, ids_TK = topk(s_TE, cfg.k)
        w_TK = torch.softmax(top_TK, dim=-1)
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        mu, log_var = self.encode(x_TD)
        valid_T1 = torch.ones_like(mu[:, :1]) if token_mask_T is None else token_mask_T[:, None].float()
        if token_mask_T is not None:  # padding and non-finite tokens take no part in the losses
            mu = torch.where(token_mask_T[:, None], mu, torch.zeros_like(mu))
            log_var = torch.where(token_mask_T[:, None], log_var, torch.zeros_like(log_var))
        kl = masked_mean(-0.5 * (1 + log_var - mu**2 - log_var.exp()).sum(-1), token_mask_T)
        present = valid_T1.sum().clamp_max(1) if valid_T1.shape[0] else valid_T1.sum()  # 0 for no token
        div = gram_to_identity(self.prototypes) * present
        if cfg.token_diversity:
            div = div + gram_to_identity(mu, None if token_mask_T is None else token_mask_T)
        # alignment: prototypes towards the (stop-gradient) latents routed to them
        with torch.no_grad():
            z = mu + torch.randn_like(mu) * (0.5 * log_var).exp() if self.training else mu
            R_TE = torch.softmax(torch.zeros_like(s_TE).scatter(1, ids_TK, top_TK), dim=-1) * valid_T1
            target_ED = R_TE.T @ z
            if cfg.align_target == "mean":
                target_ED = target_ED / R_TE.sum(0)[:, None].clamp_min(1e-12)
        align = (self.prototypes.float() - target_ED).abs().mean() * present
        total = cfg.diversity_weight * div + cfg.kl_weight * kl + cfg.align_weight * align
        losses = {"lpr": total, "lpr_diversity": div, "lpr_kl": kl, "lpr_align": align}
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        scores_TE = torch.softmax(s_TE, dim=-1)
        return RoutingPlan(ids_TK, w_TK, keep_TK, scores_TE, logits_TE, losses, token_mask_T)

    def aligned_input(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """LPR's expert input ``x + W_a(softmax(s) P)`` (the aligner residual), shaped like ``x``."""
        v_Td = torch.softmax(plan.logits_TE, dim=-1) @ self.prototypes.float()
        a = nn.functional.linear(v_Td, self.aligner.weight.float(), self.aligner.bias.float())
        return x + a.view(x.shape).to(x.dtype)


def _lpr_preset(name: str, align: float, model: str) -> Preset:
    return register_preset(
        Preset(
            name=name,
            router="lpr",
            options={"k": 8, "latent_dim": 16, "align_weight": align},
            num_experts=128,
            layer={"activation": "swiglu"},
            loss_coefficients={"lpr": 0.01},
            papers=("latent-prototype-routing",),
            description=(
                f"LPR (Yang 2025, arXiv 2506.21328) in its {model} setting: 128 experts, top-8, latent "
                f"dimension 16, diversity 1, KL 0.01, alignment {align}, the sum weighted 0.01, "
                "no Switch loss."
            ),
            deviations=(
                "Values from the official configs; the alignment target is a centroid (the code's a sum)."
            ),
        )
    )


LPR_QWEN3 = _lpr_preset("lpr_qwen3", 0.1, "Qwen3-MoE")
LPR_MIXTRAL = _lpr_preset("lpr_mixtral", 0.05, "Mixtral")
