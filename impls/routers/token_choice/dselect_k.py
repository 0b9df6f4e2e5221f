r"""DSelect-k: a continuously differentiable gate that selects at most k experts (Hazimeh et al.).

Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong, Chi, "DSelect-k: Differentiable
Selection in the Mixture of Experts with Applications to Multi-Task Learning", NeurIPS 2021,
arXiv 2106.03760 (Sec. 3; official code: google-research `dselect_k_moe`).

With $E$ experts and $m = \lceil \log_2 E \rceil$, a *single-expert selector* with parameters
$z \in \mathbb{R}^m$ puts on expert $e$ (binary code $\ell(e) \in \{0, 1\}^m$, most significant bit
first) the weight

$$
r(z)_e = \prod_{j=1}^{m} S(z_j)^{\,\ell(e)_j} \big(1 - S(z_j)\big)^{1 - \ell(e)_j},
\qquad
S(t) = \begin{cases} 0 & t \le -\gamma/2 \\ -\tfrac{2}{\gamma^3} t^3 + \tfrac{3}{2\gamma} t + \tfrac12
& |t| < \gamma/2 \\ 1 & t \ge \gamma/2 \end{cases}
$$

($S$ is the smooth-step function: continuously differentiable, and *exactly* 0 or 1 outside the
polynomial region). DSelect-k mixes $k$ selectors with softmax weights:

$$
q = \sum_{i=1}^{k} \operatorname{softmax}(\alpha)_i \; r\big(z^{(i)}\big),
\qquad y = \sum_{e=1}^{E} q_e\, f_e(x).
$$

Once every $z^{(i)}_j$ has left the polynomial region each selector is one-hot, so $q$ has at most
$k$ non-zero entries — exactly $k$ when the selectors pick distinct experts. Two forms:
`conditioning="example"` (the per-example gate: $z^{(i)} = W^{(i)} x + b^{(i)}$,
$\alpha = A x + c$; per token here) and `conditioning="static"` (the task-only gate: $z$ and
$\alpha$ are parameters, the same for every token, as for one task of a multi-task model).

Losses (unweighted): `entropy`, the selectors' entropy $\sum_i H(r(z^{(i)}))$ with
$H(p) = -\sum_e p_e \log(p_e + 10^{-6})$, which speeds up convergence to binary selectors (the
paper's entropy regularization; weight it, and schedule the weight, in `plan.aux_loss`); and, when
$E$ is not a power of two, `reachability` $= \sum_i 1 / \sum_{e < E} r(z^{(i)})_e$, which keeps
each selector's mass on codes that name an existing expert (as the official code does).
Deviations: both are averaged over tokens (valid ones only) where the reference sums them over
the batch (multiply the coefficient by the batch size to match it), and the reachable mass is
clamped at $10^{-6}$ so that a selector with all its mass on unreachable codes gives a large
finite loss instead of an infinite one.

The plan has one slot per expert ($K = E$): slot $e$ is kept where $q_e > 0$, so before
convergence several experts compute a token and afterwards at most $k$. The gate has no
per-expert logits; the plan's `logits_TE` holds $\log q$ (with $\log 0$ clamped to $-69$). The
initialization follows the official code: $z$ weights and biases uniform in
$\pm\gamma/100$, $\alpha$ weights and biases uniform in $\pm 0.05$.

## Usage

```python
import torch, impls

gate = impls.build_router("dselect_k", d_model=16, num_experts=8, k=2)
plan = gate(torch.randn(5, 16))
print(plan.weights_TK.sum(-1))                               # 1 for every token (E = 2^3)
loss = plan.aux_loss({"entropy": 1e-3})                      # the entropy regularizer
task_gate = impls.build_router("dselect_k", d_model=16, num_experts=8, k=2, conditioning="static")
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from impls.functional import masked_mean
from impls.plan import RoutingPlan
from impls.registry import register_router
from impls.router import Router, RouterConfig

__all__ = ["DSelectKConfig", "DSelectKRouter", "smooth_step"]

ENTROPY_EPS = 1e-6
"""The constant inside the entropy's logarithm (the official code's ``EPSILON``)."""


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """DSelect-k's smooth-step ``S`` (Sec. 3; from arXiv 2002.07772): 0, a cubic, then 1."""
    cubic = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
    return torch.where(
        t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic)
    )


def binary_codes(num_experts: int) -> torch.Tensor:
    """``bool [E, m]``: row ``e`` is the binary code of ``e``, most significant bit first."""
    m = math.ceil(math.log2(num_experts)) if num_experts > 1 else 0
    e = torch.arange(num_experts)[:, None]
    shifts = torch.arange(m - 1, -1, -1)[None, :]
    return ((e >> shifts) & 1).bool()


@dataclass(frozen=True, kw_only=True)
class DSelectKConfig(RouterConfig):
    """Options of ``DSelectKRouter``.

    Attributes:
        k: number of single-expert selectors, the most experts a token ends up with.
        gamma: width of the smooth-step's polynomial region.
        conditioning: ``"example"`` (per-token gate) or ``"static"`` (one gate for all tokens).
    """

    k: int = 2
    gamma: float = 1.0
    conditioning: Literal["example", "static"] = "example"

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be a finite number > 0, got {self.gamma}")
        if self.conditioning not in ("example", "static"):
            raise ValueError(f"conditioning must be 'example' or 'static', got {self.conditioning!r}")
        if self.has_capacity:
            raise ValueError("DSelect-k mixes every selected expert; capacity_factor is not supported")


@register_router
class DSelectKRouter(Router):
    """DSelect-k gate (Hazimeh et al., NeurIPS 2021, Sec. 3): ``k`` smooth-step binary selectors."""

    name = "dselect_k"
    papers = ("dselect-k",)
    causal = True
    Config = DSelectKConfig
    config: DSelectKConfig

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        cfg = self.config
        codes = binary_codes(num_experts)
        self.num_binary = codes.shape[1]
        self.register_buffer("codes_EM", codes, persistent=False)
        width = cfg.k * self.num_binary
        z_bound, w_bound = cfg.gamma / 100, 0.05
        if cfg.conditioning == "example":
            self.gate = nn.Linear(d_model, width + cfg.k, bias=True, dtype=torch.float32)
            with torch.no_grad():
                for param in (self.gate.weight, self.gate.bias):
                    param[:width].uniform_(-z_bound, z_bound)
                    param[width:].uniform_(-w_bound, w_bound)
            self.static_logits = None
        else:
            self.gate = None
            init = torch.cat(
                [torch.empty(width).uniform_(-z_bound, z_bound), torch.empty(cfg.k).uniform_(0, 1)]
            )
            self.static_logits = nn.Parameter(init.float())

    @property
    def max_experts_per_token(self) -> int:
        return self.num_experts  # before convergence a selector spreads over many experts

    @property
    def combine_normalization(self) -> float | str:
        return 1.0 if self.num_experts == 2**self.num_binary else "at_most_one"

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``[T, k*m + k]``: the selectors' ``z`` (k rows of m) then the selector logits ``alpha``."""
        if self.static_logits is not None:
            return self.static_logits.float().expand(x_TD.shape[0], -1) + 0.0 * x_TD[:, :1]
        b = self.gate.bias.float() if self.gate.bias is not None else None
        return nn.functional.linear(x_TD, self.gate.weight.float(), b)

    def selector_outputs(self, logits_TS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r_TKE, alpha_TK)``: every selector's weights over the experts, and the selector logits."""
        cfg, E, m = self.config, self.num_experts, self.num_binary
        T = logits_TS.shape[0]
        z_TKM = logits_TS[:, : cfg.k * m].reshape(T, cfg.k, m)
        alpha_TK = logits_TS[:, cfg.k * m :]
        s_TK1M = smooth_step(z_TKM, cfg.gamma)[:, :, None, :]
        r_TKE = (
            torch.where(self.codes_EM, s_TK1M, 1.0 - s_TK1M).prod(-1)
            if m
            else logits_TS.new_ones(T, cfg.k, E)
        )
        return r_TKE, alpha_TK

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        E = self.num_experts
        r_TKE, alpha_TK = self.selector_outputs(logits_TE)
        q_TE = (alpha_TK.softmax(-1)[:, :, None] * r_TKE).sum(1)
        T = q_TE.shape[0]
        ids_TK = torch.arange(E, device=q_TE.device).expand(T, E)
        keep_TK = q_TE > 0
        entropy_T = -(r_TKE * torch.log(r_TKE + ENTROPY_EPS)).sum((1, 2))
        losses = {"entropy": masked_mean(entropy_T, token_mask_T)}
        if 2**self.num_binary != E:
            reach_TK = r_TKE.sum(-1).clamp_min(ENTROPY_EPS)  # clamped: all mass unreachable is not inf
            losses["reachability"] = masked_mean((1.0 / reach_TK).sum(-1), token_mask_T)
        weights_TK = torch.where(keep_TK, q_TE, torch.zeros_like(q_TE))
        log_q = torch.log(q_TE.clamp_min(1e-30))
        return RoutingPlan(ids_TK, weights_TK, keep_TK, q_TE, log_q, losses, token_mask_T)
