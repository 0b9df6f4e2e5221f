r"""X-MoE: routing scores on a low-dimensional hypersphere (Chi et al., NeurIPS 2022).

A learned router $s_i = h \cdot e_i$ pulls every token representation towards the centroid of
the expert it is routed to, a drift towards *representation collapse* (Sec. 2.2). X-MoE scores
tokens against experts in a small space instead (Sec. 3.1): a bias-free projection
$W \in \mathbb{R}^{d_e \times d}$ maps the token down to $d_e$ dimensions, both the projected token
and the expert embeddings $e_i \in \mathbb{R}^{d_e}$ are L2-normalized, and the routing score is
their cosine (Eq. 7), so it lies in $[-1, 1]$ and does not depend on the token's norm:

$$
s_i = \frac{(W h) \cdot e_i}{\lVert W h \rVert \, \lVert e_i \rVert}, \qquad
g(s_k) = \frac{\exp(s_k / \tau)}{\sum_j \exp(s_j / \tau)} \quad \text{(Eq. 8)},
$$

with $\tau$ one *learnable* temperature scalar (the sigmoid variant uses $\sigma(s_k / \tau)$).
The token goes to the top-1 expert $k = \arg\max_i s_i$ and $f(h) = h + g(s_k)\,\mathrm{FFN}_k(h)$
(Eq. 2). The balance loss is Switch's, computed with a **fixed** temperature $\tau_0$ (Eq. 9):

$$
\mathcal{L}_\text{bal} = N \sum_{i=1}^{N} t_i \cdot
\frac{1}{|B|} \sum_{h \in B} \frac{\exp(s_i / \tau_0)}{\sum_j \exp(s_j / \tau_0)},
$$

$t_i$ the fraction of tokens routed to expert $i$, $\tau_0 = 0.3$ for softmax gating and $0.07$
for sigmoid gating (Sec. 4.1). The plan's `logits_TE` are $s / \tau$ (so they lie in
$[-1/\tau, 1/\tau]$); `cosine_scores(x)` returns $s$ itself. The expert embeddings are kept at a
fixed L2 norm (0.1, the paper's "implementation tips" in Sec. 3.1): `on_optimizer_step()` (or
`impls.step_routers(model)`) projects them back after every optimizer step, so training only
turns them.

With `k > 1` (the paper's Table 7 reports top-2) the experts are the $k$ best cosines and the
softmax weights are renormalized over them, as the official code does before dropping.

## Defaults and what is confirmed

Confirmed in the paper: $d_e = 16$ with 32 experts ("typically $d_e = N/2$"), top-1, softmax
gating, $\tau_0 = 0.3$ / $0.07$, the fixed norm 0.1 of the expert embeddings. Not confirmed: the
initial value of $\tau$ and the pre-training weight $\alpha$ of the balance loss (both in the
paper's appendix, which was not read). The preset starts $\tau$ at $\tau_0$ and uses
$\alpha = 0.01$ (the official example scripts' gate-loss weight; also the best value of the
paper's fine-tuning ablation).

**Deviations from the official code** (microsoft/torchscale, `use_xmoe`), which differs from the
paper: the code normalizes only the expert embeddings (its token normalization is commented out),
has no learnable $\tau$, keeps the embeddings at norm 1.5, and its top-2 keeps the second expert
at random. This module follows the paper: cosine on both sides, learnable $\tau$, norm 0.1,
deterministic top-$k$. $\tau$ is clamped below at $10^{-2}$ so the logits stay bounded.

## Usage

```python
import torch, impls

router = impls.build_router("x_moe", d_model=64)       # 32 experts, d_e = 16, top-1
x = torch.randn(10, 64)
plan = router(x)
s = router.cosine_scores(x)                            # in [-1, 1], the same for 3 * x
print(plan.expert_ids_TK[:, 0], plan.losses["load_balance"])
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from impls.functional import load_balance_loss, topk
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig

__all__ = ["XMoEConfig", "XMoERouter"]

MIN_TEMPERATURE = 1e-2
"""Lower clamp of the learnable temperature (keeps ``s / tau`` bounded)."""


@dataclass(frozen=True, kw_only=True)
class XMoEConfig(RouterConfig):
    """Options of ``XMoERouter``.

    Attributes:
        k: experts per token (the paper's main setting is 1).
        routing_dim: ``d_e``, the dimension of the routing space (``None`` = ``max(1, E // 2)``).
        gate: ``"softmax"`` or ``"sigmoid"`` gating of the selected score (Eq. 8).
        temperature: initial value of the learnable temperature ``tau`` (``None`` = ``tau0``).
        balance_temperature: the fixed ``tau0`` of the balance loss (``None`` = 0.3 for softmax
            gating, 0.07 for sigmoid gating, Sec. 4.1).
        learn_temperature: train ``tau`` (the paper) or keep it fixed.
        embedding_norm: the fixed L2 norm of the expert embeddings (0.1; ``None`` = no rescaling).
    """

    k: int = 1
    routing_dim: int | None = None
    gate: Literal["softmax", "sigmoid"] = "softmax"
    temperature: float | None = None
    balance_temperature: float | None = None
    learn_temperature: bool = True
    embedding_norm: float | None = 0.1

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.routing_dim is not None and (not isinstance(self.routing_dim, int) or self.routing_dim < 1):
            raise ValueError(f"routing_dim must be an int >= 1 or None, got {self.routing_dim!r}")
        if self.gate not in ("softmax", "sigmoid"):
            raise ValueError(f"gate must be 'softmax' or 'sigmoid', got {self.gate!r}")
        for name in ("temperature", "balance_temperature", "embedding_norm"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 or None, got {v}")
        if self.temperature is not None and self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be >= {MIN_TEMPERATURE}, got {self.temperature}")

    @property
    def tau0(self) -> float:
        if self.balance_temperature is not None:
            return self.balance_temperature
        return 0.3 if self.gate == "softmax" else 0.07


@register_router
class XMoERouter(Router):
    """X-MoE router: cosine scores of a low-dimensional projection, learnable temperature.

    Chi et al., "On the Representation Collapse of Sparse Mixture of Experts", NeurIPS 2022,
    arXiv 2204.09179: Sec. 3.1 (dimension reduction, L2 normalization Eq. 7, gating with a
    learnable temperature Eq. 8), Sec. 3.2 (balance loss with a fixed temperature Eq. 9).
    """

    name = "xmoe"
    papers = ("x-moe",)
    causal = True
    Config = XMoEConfig
    config: XMoEConfig

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        cfg = self.config
        d_e = cfg.routing_dim or max(1, num_experts // 2)
        self.routing_dim = d_e
        self.gate = None
        self.projection = nn.Linear(d_model, d_e, bias=cfg.router_bias, dtype=torch.float32)
        emb = torch.empty(num_experts, d_e, dtype=torch.float32)
        nn.init.orthogonal_(emb)
        if cfg.embedding_norm is not None:
            emb = emb * (cfg.embedding_norm / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        self.expert_embeddings = nn.Parameter(emb)
        tau = cfg.temperature if cfg.temperature is not None else cfg.tau0
        self.temperature = nn.Parameter(torch.tensor(float(tau)), requires_grad=cfg.learn_temperature)

    @property
    def combine_normalization(self) -> float | str | None:
        if self.config.gate == "sigmoid":
            return None
        return "at_most_one" if self.config.k == 1 else 1.0

    def cosine_scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``float32 [T, E]``: the cosine ``s`` of Eq. 7, in ``[-1, 1]``, independent of ``x``'s scale."""
        b = self.projection.bias.float() if self.projection.bias is not None else None
        z_TR = nn.functional.linear(x_TD.float(), self.projection.weight.float(), b)
        z_TR = nn.functional.normalize(z_TR, dim=-1, eps=1e-12)
        e_ER = nn.functional.normalize(self.expert_embeddings.float(), dim=-1, eps=1e-12)
        return z_TR @ e_ER.T

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``s / tau``, the argument of Eq. 8."""
        return self.cosine_scores(x_TD) / self.temperature.float().clamp_min(MIN_TEMPERATURE)

    @torch.no_grad()
    def on_optimizer_step(self, process_group=None) -> None:
        """Project the expert embeddings back to their fixed norm (Sec. 3.1) after an update."""
        norm = self.config.embedding_norm
        if norm is not None:
            e = self.expert_embeddings
            e.mul_(norm / e.float().norm(dim=-1, keepdim=True).clamp_min(1e-12).to(e.dtype))

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        cfg = self.config
        scores_TE = torch.softmax(logits_TE, dim=-1) if cfg.gate == "softmax" else torch.sigmoid(logits_TE)
        w_TK, ids_TK = topk(scores_TE, cfg.k)
        if cfg.gate == "softmax" and cfg.k > 1:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        tau = self.temperature.float().clamp_min(MIN_TEMPERATURE).detach()
        s_TE = logits_TE * tau  # the cosine, carrying the gradient of the projection and embeddings
        balance_probs_TE = torch.softmax(s_TE / cfg.tau0, dim=-1)
        losses = {"load_balance": load_balance_loss(balance_probs_TE, ids_TK, token_mask_T)}
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        return RoutingPlan(ids_TK, w_TK, keep_TK, scores_TE, logits_TE, losses, token_mask_T)


X_MOE = register_preset(
    Preset(
        name="x_moe",
        router="xmoe",
        options={"k": 1, "routing_dim": 16, "gate": "softmax"},
        num_experts=32,
        loss_coefficients={"load_balance": 0.01},
        papers=("x-moe",),
        description=(
            "X-MoE (Chi et al., NeurIPS 2022, arXiv 2204.09179): 32 experts, routing dimension 16, "
            "cosine scores with a learnable temperature, top-1, softmax gating."
        ),
        deviations=(
            "The initial temperature (set to tau0 = 0.3) and the balance-loss weight (0.01, the official "
            "scripts' value) are not confirmed in the paper. The paper's model inserts one MoE layer of 3 "
            "stacked FFN sublayers; the preset configures the router only."
        ),
    )
)
