r"""Routing-Free MoE (Liu, Han, Yan, Tresp, Ma 2026): experts that switch themselves on, no central router.

There is no gate matrix, no softmax and no top-$k$. Every expert $i$ owns a low-rank projection
$A_i \in \mathbb{R}^{D \times r}$ (the first factor of its own gate branch, Eq. 6) and scores the
token itself (Eq. 9-10),

$$
G_i(x) = \operatorname{ReLU}\big(\lVert x A_i \rVert_2 - b_i\big), \qquad
f_i(x) = \mathbb{1}\{G_i(x) \ge \theta\}, \qquad
h = x + \sum_i f_i(x)\, G_i(x)\, E_i(x),
$$

with a learnable bias $b_i$ and a global threshold $\theta$; the score scales the expert's
output, which is how $A_i$ and $b_i$ learn. A token uses anywhere from 0 to $E$ experts.

**Balance** (Sec. 3.2) is a product of averages over the expert axis and the token axis
(Eq. 13-15), with the density proxy $\tilde G = f \cdot G$ (the released code's form: only active
pairs count),

$$
\mathcal{L}_\text{EB} = \frac{1}{E}\sum_i \overline{f_i}^{\,x} \; \overline{\tilde G_i}^{\,x}, \qquad
\mathcal{L}_\text{TB} = \frac{1}{T}\sum_x \overline{f(x)}^{\,i} \; \overline{\tilde G(x)}^{\,i}, \qquad
\mathcal{L}_\text{LB} = \mu \mathcal{L}_\text{EB} + (1 - \mu) \mathcal{L}_\text{TB},
$$

added as $\lambda_t \mathcal{L}_\text{LB}$ with the coefficient adapted towards a target density
$\rho_\infty$ (the fraction of active (token, expert) pairs; Eq. 16-17, after ReMoE):
$\lambda_{t+1} = \min\big(\lambda_t (1 + \eta)^{\operatorname{sign}(\rho_t - \rho_\infty)}, 1\big)$.

The router returns `expert_token_balance` ($\mathcal{L}_\text{LB}$, unweighted) and
`expert_token_balance_adaptive` ($\lambda_t \mathcal{L}_\text{LB}$: add it with coefficient 1). It
counts active pairs in training; **`router.on_optimizer_step()`** (or `impls.step_routers(model)`)
turns the counts since the last call into $\rho_t$ and updates $\lambda$ (float32 buffer, in the
state dict). Under gradient accumulation call it once per optimizer step; with data parallelism
pass the process group so that every rank applies the same update. The plan has $E$ slots,
inactive ones `-1`; its weights are the scores $G_i$ and its `scores_TE` each expert's share
$G_i / \sum_j G_j$ of the token's total score.

`RoutingFreeMoE` is the paper's whole layer: the experts are AoE-style SwiGLU FFNs whose gate
branch starts with the same $A_i$ the router scores with,
$E_i(x) = [\operatorname{SiLU}(x A_i B_i) \odot x W^{up}_i] W^{down}_i$ (Eq. 6).

## Defaults and what is confirmed

From the paper (Sec. 3-4, Table 8) and the official code: $\rho_\infty = 1/4$, $\lambda_0 = 10^{-10}$,
$\eta = 0.02$, $\mu = 0.5$, rank $r = 32$ at the small scale (48 and 64 at the larger ones), the
$L_2$ norm; $\theta = 1$ from the release script (the paper does not state the training value);
$\lambda$ capped at 1 as in the code; the bias starts at $10^{-6}$ (all experts active at first).

**Deviations.** The paper steers one density over all layers (Sec. 5.1, better than per-layer);
here each layer's router adapts its own $\lambda$ to its own density. The code updates $\lambda$ on
every micro-batch; here once per optimizer step. The code's extra learnable scale on the norm is
an option (`norm_scale=True`), off by default (the paper's Eq. 9). Eq. 12 as printed averages
$G$ over all pairs; the loss here uses the code's $f \cdot G$, the form that produced the paper's
numbers.

## Usage

```python
import torch, impls
from impls.routers.token_choice.routing_free import RoutingFreeMoE

moe = RoutingFreeMoE(64, d_act=32, num_experts=8, rank=16)
h, plan = moe(torch.randn(2, 10, 64))                   # h = x + sum_i f_i G_i E_i(x)
loss = h.pow(2).mean() + plan.losses["expert_token_balance_adaptive"]
loss.backward()
impls.step_routers(moe)                                  # lambda *= 1.02 or / 1.02
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from impls.functional import masked_mean
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig, all_reduce_sum, recomputing_in_backward

__all__ = ["RoutingFreeConfig", "RoutingFreeMoE", "RoutingFreeRouter", "routing_free_balance"]


def routing_free_balance(
    active_TE: torch.Tensor, score_TE: torch.Tensor, mu: float, token_mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """``mu * L_EB + (1 - mu) * L_TB`` (Eq. 13-15) with the proxy ``f * G``, over the valid tokens."""
    f = active_TE.float()
    g = score_TE * f
    eb = (masked_mean(f, token_mask_T) * masked_mean(g, token_mask_T)).mean()
    tb = masked_mean(f.mean(-1) * g.mean(-1), token_mask_T)
    return mu * eb + (1 - mu) * tb


@dataclass(frozen=True, kw_only=True)
class RoutingFreeConfig(RouterConfig):
    """Options of ``RoutingFreeRouter``.

    Attributes:
        rank: ``r``, the width of each expert's projection ``A_i``.
        threshold: ``theta``; an expert is active where ``G_i >= theta``.
        density_target: ``rho_inf``, the target fraction of active (token, expert) pairs.
        lambda_init, lambda_step, lambda_max: ``lambda_0``, ``eta`` and the cap of Eq. 17's schedule.
        mu: weight of expert balancing against token balancing (Eq. 15).
        bias_init: initial ``b_i``.
        norm_scale: the released code's learnable per-expert scale on the norm.
    """

    rank: int = 32
    threshold: float = 1.0
    density_target: float = 0.25
    lambda_init: float = 1e-10
    lambda_step: float = 0.02
    lambda_max: float = 1.0
    mu: float = 0.5
    bias_init: float = 1e-6
    norm_scale: bool = False

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {self.rank!r}")
        if not self.threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")
        if not 0 < self.density_target <= 1:
            raise ValueError(f"density_target must be in (0, 1], got {self.density_target}")
        if not (self.lambda_init > 0 and self.lambda_step > 0 and self.lambda_max >= self.lambda_init):
            raise ValueError("lambda_init and lambda_step must be > 0 and lambda_max >= lambda_init")
        if not 0 <= self.mu <= 1:
            raise ValueError(f"mu must be in [0, 1], got {self.mu}")
        if self.has_capacity:
            raise ValueError("routing-free experts are dropless; capacity_factor is not supported")
        if self.router_bias:
            raise ValueError("routing-free MoE has no gate; router_bias does not apply (b_i is built in)")


@register_router
class RoutingFreeRouter(Router):
    """Self-activating experts: ``G_i = ReLU(||x A_i|| - b_i)``, active where ``G_i >= theta``.

    Liu, Han, Yan, Tresp, Ma, "Routing-Free Mixture-of-Experts", arXiv 2604.00801 (2026):
    Sec. 3.1 (Eq. 6, 9, 10), Sec. 3.2 (Eq. 11-17).
    """

    name = "routing_free"
    papers = ("routing-free-moe",)
    causal = True
    Config = RoutingFreeConfig
    config: RoutingFreeConfig
    fp32_buffers = ("balance_coefficient", "active_pairs", "routed_pairs")

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        cfg = self.config
        self.gate = None
        bound = 1.0 / math.sqrt(d_model)  # nn.Linear's default range, as the code's projections
        self.proj = nn.Parameter(torch.empty(num_experts, d_model, cfg.rank, dtype=torch.float32))  # A_i
        nn.init.uniform_(self.proj, -bound, bound)
        self.bias = nn.Parameter(torch.full((num_experts,), cfg.bias_init, dtype=torch.float32))  # b_i
        self.scale = nn.Parameter(torch.ones(num_experts, dtype=torch.float32)) if cfg.norm_scale else None
        self.register_buffer("balance_coefficient", torch.tensor(cfg.lambda_init, dtype=torch.float32))
        self.register_buffer("active_pairs", torch.zeros((), dtype=torch.float32), persistent=False)
        self.register_buffer("routed_pairs", torch.zeros((), dtype=torch.float32), persistent=False)

    @property
    def max_experts_per_token(self) -> int:
        return self.num_experts

    @property
    def combine_normalization(self) -> None:
        return None  # the raw scores G_i

    def low_rank(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``[T, E, r]``: every expert's ``x A_i`` (float32)."""
        return torch.einsum("td,edr->ter", x_TD.float(), self.proj.float())

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``[T, E]`` pre-activation scores ``||x A_i|| (* s_i) - b_i``."""
        norm_TE = self.low_rank(x_TD).norm(dim=-1)
        if self.scale is not None:
            norm_TE = norm_TE * self.scale.float()
        return norm_TE - self.bias.float()

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        cfg, E = self.config, self.num_experts
        score_TE = torch.relu(logits_TE)  # G_i (Eq. 9)
        active_TE = score_TE >= cfg.threshold  # f_i (Eq. 10)
        if cfg.threshold == 0:
            active_TE = active_TE & (score_TE > 0)
        if token_mask_T is not None:
            active_TE = active_TE & token_mask_T[:, None]
        T = logits_TE.shape[0]
        ids_TK = torch.where(active_TE, torch.arange(E, device=logits_TE.device).expand(T, E), -1)
        w_TK = torch.where(active_TE, score_TE, torch.zeros_like(score_TE))
        balance = routing_free_balance(active_TE, score_TE, cfg.mu, token_mask_T)
        if self.training and torch.is_grad_enabled() and not recomputing_in_backward():
            with torch.no_grad():
                n_valid = T if token_mask_T is None else token_mask_T.sum()
                self.active_pairs += active_TE.sum()
                self.routed_pairs += n_valid * E
        losses = {
            "expert_token_balance": balance,
            "expert_token_balance_adaptive": self.balance_coefficient * balance,
        }
        density = masked_mean(active_TE.float().mean(-1), token_mask_T)
        share_TE = score_TE / score_TE.sum(-1, keepdim=True).clamp_min(1e-20)  # each expert's share of G
        return RoutingPlan(
            ids_TK, w_TK, active_TE, share_TE, logits_TE, losses, token_mask_T, info={"density": density}
        )

    @torch.no_grad()
    def on_optimizer_step(self, process_group=None) -> None:
        """Eq. 17: ``lambda = min(lambda * (1 + eta) ** sign(rho - rho_inf), lambda_max)``."""
        cfg = self.config
        counts = torch.stack([self.active_pairs, self.routed_pairs])
        all_reduce_sum(counts, process_group)
        active, routed = counts
        density = active / routed.clamp_min(1)
        direction = torch.sign(density - cfg.density_target) * (routed > 0)
        self.balance_coefficient.mul_((1 + cfg.lambda_step) ** direction).clamp_(max=cfg.lambda_max)
        self.active_pairs.zero_()
        self.routed_pairs.zero_()


class RoutingFreeMoE(nn.Module):
    """The routing-free layer's mixture: ``sum_i f_i G_i E_i(x)`` plus the residual ``x`` (Eq. 6, 9, 10).

    Expert ``i`` is ``[SiLU(x A_i B_i) * (x W_up_i)] W_down_i``; ``A_i`` is the router's projection.
    Dense reference: every expert is computed and the inactive ones weighted 0.
    """

    def __init__(
        self,
        d_model: int,
        d_act: int,
        num_experts: int,
        rank: int = 32,
        residual: bool = True,
        **options: Any,
    ):
        super().__init__()
        self.residual = residual
        self.router = RoutingFreeRouter(d_model, num_experts, rank=rank, **options)
        self.B = nn.Parameter(torch.empty(num_experts, rank, d_act))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, d_act))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_act, d_model))
        for p, fan_in in ((self.B, rank), (self.w_up, d_model), (self.w_down, d_act)):
            nn.init.uniform_(p, -(fan_in**-0.5), fan_in**-0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RoutingPlan]:
        lead, D = x.shape[:-1], x.shape[-1]
        x_TD = x.reshape(-1, D)
        plan = self.router(x_TD)
        xa_TER = self.router.low_rank(x_TD).to(x.dtype)
        gate_TEF = nn.functional.silu(torch.einsum("ter,erf->tef", xa_TER, self.B))
        up_TEF = torch.einsum("td,edf->tef", x_TD, self.w_up)
        out_TED = torch.einsum("tef,efd->ted", gate_TEF * up_TEF, self.w_down)
        w_TE = (plan.weights_TK * plan.keep_TK).to(x.dtype)  # slot e is expert e
        y = torch.einsum("ted,te->td", out_TED, w_TE)
        if self.residual:
            y = y + x_TD
        return y.view(*lead, D), plan


ROUTING_FREE_S = register_preset(
    Preset(
        name="routing_free_s",
        router="routing_free",
        options={
            "rank": 32,
            "threshold": 1.0,
            "density_target": 0.25,
            "lambda_init": 1e-10,
            "lambda_step": 0.02,
        },
        num_experts=12,
        loss_coefficients={"expert_token_balance_adaptive": 1.0},
        papers=("routing-free-moe",),
        description=(
            "Routing-Free MoE, small scale (Liu et al. 2026, arXiv 2604.00801, Table 8): 12 experts, "
            "rank 32, threshold 1, target density 1/4, lambda_0 = 1e-10, eta = 0.02, mu = 0.5."
        ),
        deviations=(
            "Per-layer density control (the paper's is global over layers); threshold 1 from the script."
        ),
    )
)
