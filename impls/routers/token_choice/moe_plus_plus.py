r"""MoE++ (Jin, Zhu, Yuan, Yan, ICLR 2025): zero-computation experts and gating residuals.

MoE++ mixes ordinary FFN experts with three kinds of **zero-computation experts** that cost
(almost) nothing, so that a token can spend its $k$ slots on cheap experts when it needs little
computation (Eq. 3-5):

* zero expert, $E(x) = 0$ (the token effectively uses fewer experts);
* copy expert, $E(x) = x$ (skips the slot);
* constant expert, $E(x) = \alpha_1 x + \alpha_2 v$ with $[\alpha_1, \alpha_2] =
  \operatorname{softmax}(W_c x)$ and a trainable vector $v$ (replaces the token by a learned one).

The router's logits get a **gating residual** from the previous layer (Eq. 6),
$G(x^j) = W^j x^j + W_g^j G(x^{j-1})$ with $W_g^j \in \mathbb{R}^{N \times N}$ (none in the first
MoE layer), and the combine weights are the softmax over all $N$ experts of the top-$k$ (Eq. 1).
Because zero-computation experts are cheap, the balance loss weights them by $\tau$ (Eq. 7-8):

$$
\mathcal{L}_b = \sum_{i=1}^{N} \eta_i f_i P_i, \qquad
\eta_i = \begin{cases} 1 & \text{FFN expert} \\ \tau & \text{zero-computation expert} \end{cases}.
$$

`MoEPlusPlusRouter` (`moe_plus_plus`) is the router over all $N$ experts, ordered FFN experts
first, then the constant, copy and zero experts (as in the official code); the gating residual is
passed with `router.gating_residual(prev_logits)` around the call (the plan's `logits_TE` are the
residual-including logits, to hand to the next layer). `MoEPlusPlusLayer` is the whole mixture:
FFN experts through the grouped kernels, the zero-computation experts in closed form.

## Defaults and what is confirmed

From the paper (Sec. 3, Eq. 1-8) and the official code: top-2 in every layer, one zero, one copy
and two constant experts (the code's counts), $\tau = 0.75$, $v \sim \mathcal{N}(0, 1)$, $W_c$ and
$W_g$ without bias. The paper's balance weight $\beta$ and capacity factor $\gamma$ (0.01, 1.1)
come from a secondary summary (`moe_pp` preset: 0.01, dropless).

**Deviations.** The released code's default gate is a two-layer tanh MLP (`gate="mlp"`, width
$8N$) and it zeroes the zero expert's weight and renormalizes the pair; this module follows the
paper's linear gate and unrenormalized softmax weights (`gate="mlp"` gives the code's gate). The
paper's heterogeneous capacities (FFN and zero-computation experts get different capacities)
are not modelled: the layer is dropless.

## Usage

```python
import torch
from impls.routers.token_choice.moe_plus_plus import MoEPlusPlusLayer

layers = [MoEPlusPlusLayer(64, 128, num_ffn_experts=6) for _ in range(2)]
x, residual = torch.randn(2, 10, 64), None
for layer in layers:
    y, plan = layer(x, gating_residual=residual)
    x, residual = x + y, plan.logits_TE
```
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from impls.functional import masked_mean, topk, z_loss
from impls.layer import GroupedExperts, combine, make_dispatch, permute
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig

__all__ = ["MoEPlusPlusConfig", "MoEPlusPlusLayer", "MoEPlusPlusRouter", "heterogeneous_balance_loss"]


def heterogeneous_balance_loss(
    probs_TN: torch.Tensor, ids_TK: torch.Tensor, eta_N: torch.Tensor, token_mask_T: torch.Tensor | None
) -> torch.Tensor:
    """``sum_i eta_i f_i P_i`` with ``f_i`` the fraction of slots routed to ``i`` (Eq. 7-8), times ``N``.

    The factor ``N`` makes a uniform router with all ``eta = 1`` score 1, as the Switch loss.
    """
    T, N = probs_TN.shape
    K = ids_TK.shape[1]
    counts_TN = torch.zeros(T, N, device=probs_TN.device).scatter_add(
        1, ids_TK, torch.ones_like(ids_TK, dtype=torch.float32)
    )
    f_N = masked_mean(counts_TN, token_mask_T) / K
    P_N = masked_mean(probs_TN.float(), token_mask_T)
    return N * (eta_N * f_N * P_N).sum()


@dataclass(frozen=True, kw_only=True)
class MoEPlusPlusConfig(RouterConfig):
    """Options of ``MoEPlusPlusRouter`` (``num_experts`` = FFN + zero-computation experts).

    Attributes:
        k: experts per token (2).
        num_zero, num_copy, num_constant: zero-computation experts, ordered after the FFN experts.
        tau: the balance-loss weight of zero-computation experts.
        gate: ``"linear"`` (the paper's ``W x``) or ``"mlp"`` (the code's
            ``Linear(D, 8N) -> tanh -> Linear``).
        gating_residual: add ``W_g G(x^{j-1})`` when a previous layer's logits are given.
    """

    k: int = 2
    num_zero: int = 1
    num_copy: int = 1
    num_constant: int = 2
    tau: float = 0.75
    gate: Literal["linear", "mlp"] = "linear"
    gating_residual: bool = True

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        for name in ("num_zero", "num_copy", "num_constant"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        cheap = self.num_zero + self.num_copy + self.num_constant
        if cheap >= num_experts:
            raise ValueError(
                f"num_experts={num_experts} must exceed the {cheap} zero-computation experts "
                "(at least one FFN expert)"
            )
        if not 0 <= self.tau <= 1:
            raise ValueError(f"tau must be in [0, 1], got {self.tau}")
        if self.gate not in ("linear", "mlp"):
            raise ValueError(f"gate must be 'linear' or 'mlp', got {self.gate!r}")
        if self.router_bias:
            raise ValueError("MoE++'s gates have no bias")
        if self.has_capacity:
            raise ValueError("MoE++'s heterogeneous capacities are not modelled; the router is dropless")

    def num_ffn(self, num_experts: int) -> int:
        return num_experts - self.num_zero - self.num_copy - self.num_constant


@register_router
class MoEPlusPlusRouter(Router):
    """Top-k softmax over FFN and zero-computation experts, gating residual, eta-weighted balance.

    Jin, Zhu, Yuan, Yan, "MoE++: Accelerating Mixture-of-Experts Methods with Zero-Computation
    Experts", ICLR 2025, arXiv 2410.07348 (Sec. 3.2-3.4, Eq. 1-8).
    """

    name = "moe_plus_plus"
    papers = ("moe-plus-plus",)
    causal = True
    Config = MoEPlusPlusConfig
    config: MoEPlusPlusConfig

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        cfg = self.config
        if cfg.gate == "mlp":
            self.gate = None
            self.mlp = nn.Sequential(
                nn.Linear(d_model, 8 * num_experts, bias=False, dtype=torch.float32),
                nn.Tanh(),
                nn.Linear(8 * num_experts, num_experts, bias=False, dtype=torch.float32),
            )
        self.residual_map = (
            nn.Linear(num_experts, num_experts, bias=False, dtype=torch.float32)
            if cfg.gating_residual
            else None
        )  # W_g
        self._residual: torch.Tensor | None = None
        eta = torch.ones(num_experts, dtype=torch.float32)
        eta[cfg.num_ffn(num_experts) :] = cfg.tau
        self.register_buffer("eta", eta, persistent=False)

    @property
    def num_ffn_experts(self) -> int:
        return self.config.num_ffn(self.num_experts)

    @contextlib.contextmanager
    def gating_residual(self, prev_logits_TN: torch.Tensor | None) -> Iterator[None]:
        """Route the calls inside the block with ``W_g @ prev_logits`` added to the logits (Eq. 6)."""
        self._residual = prev_logits_TN
        try:
            yield
        finally:
            self._residual = None

    @property
    def combine_normalization(self) -> str:
        return "at_most_one"

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.config.gate == "mlp":
            w1, w2 = self.mlp[0], self.mlp[2]
            h = torch.tanh(nn.functional.linear(x_TD, w1.weight.float()))
            logits = nn.functional.linear(h, w2.weight.float())
        else:
            logits = super().compute_logits(x_TD)
        prev = self._residual
        if prev is not None and self.residual_map is not None and prev.numel():
            prev = prev.reshape(-1, self.num_experts).float()
            if prev.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"MoEPlusPlusRouter: the gating residual has {prev.shape[0]} tokens, "
                    f"x has {logits.shape[0]}"
                )
            logits = logits + nn.functional.linear(prev, self.residual_map.weight.float())
        return logits

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        cfg = self.config
        probs_TN = torch.softmax(logits_TE, dim=-1)
        w_TK, ids_TK = topk(probs_TN, cfg.k)
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        losses = {
            "load_balance": heterogeneous_balance_loss(probs_TN, ids_TK, self.eta, token_mask_T),
            "z_loss": z_loss(logits_TE, token_mask_T),
        }
        zc = masked_mean((ids_TK >= self.num_ffn_experts).float().mean(-1), token_mask_T)
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        return RoutingPlan(
            ids_TK,
            w_TK,
            keep_TK,
            probs_TN,
            logits_TE,
            losses,
            token_mask_T,
            info={"zero_compute_fraction": zc},
        )


class MoEPlusPlusLayer(nn.Module):
    """The MoE++ mixture: FFN experts (grouped kernels), zero, copy and constant experts in closed form.

    ``forward(x, gating_residual=None)`` returns ``(y, plan)``; pass ``plan.logits_TE`` to the next
    layer as its ``gating_residual``. Add the residual stream yourself, as with ``impls.MoELayer``.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_ffn_experts: int = 6,
        *,
        activation: Literal["gelu", "swiglu"] = "swiglu",
        **router_options: Any,
    ):
        super().__init__()
        zc = {n: router_options.pop(n, d) for n, d in (("num_zero", 1), ("num_copy", 1), ("num_constant", 2))}
        total = num_ffn_experts + sum(zc.values())
        self.router = MoEPlusPlusRouter(d_model, total, **zc, **router_options)
        self.experts = GroupedExperts(num_ffn_experts, d_model, d_hidden, activation)
        n_const = zc["num_constant"]
        self.const_vectors = nn.Parameter(torch.randn(n_const, d_model))  # v, N(0, 1)
        self.const_gates = nn.Parameter(torch.empty(n_const, 2, d_model))  # W_c
        nn.init.uniform_(self.const_gates, -(d_model**-0.5), d_model**-0.5)

    def forward(
        self, x: torch.Tensor, gating_residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RoutingPlan]:
        lead, D = x.shape[:-1], x.shape[-1]
        x_TD = x.reshape(-1, D)
        with self.router.gating_residual(gating_residual):
            plan = self.router(x_TD)
        F, cfg = self.router.num_ffn_experts, self.router.config
        ids_TK, w_TK = plan.expert_ids_TK, plan.weights_TK
        is_ffn_TK = (ids_TK < F) & plan.keep_TK
        ffn_plan = RoutingPlan(
            torch.where(is_ffn_TK, ids_TK, -1),
            torch.where(is_ffn_TK, w_TK, torch.zeros_like(w_TK)),
            is_ffn_TK,
            plan.scores_TE[:, :F],
            plan.logits_TE[:, :F],
        )
        d = make_dispatch(ffn_plan)
        y_ND = self.experts(permute(x_TD.to(self.experts.w_in_EDF.dtype), d), d)
        y_TD = combine(y_ND, d, ffn_plan.weights_TK, x_TD.dtype)
        # closed-form experts: constant (F .. F+c-1), copy (next), zero (last)
        c = cfg.num_constant
        w_TN = torch.zeros(x_TD.shape[0], self.router.num_experts, device=x.device, dtype=w_TK.dtype)
        w_TN = w_TN.scatter_add(1, ids_TK, w_TK * plan.keep_TK)
        if c:
            alpha_TC2 = torch.softmax(torch.einsum("td,cjd->tcj", x_TD, self.const_gates), dim=-1)
            const_TCD = alpha_TC2[..., :1] * x_TD[:, None] + alpha_TC2[..., 1:] * self.const_vectors[None]
            y_TD = y_TD + torch.einsum("tc,tcd->td", w_TN[:, F : F + c].to(x.dtype), const_TCD)
        if cfg.num_copy:
            y_TD = y_TD + w_TN[:, F + c : F + c + cfg.num_copy].sum(-1, keepdim=True).to(x.dtype) * x_TD
        return y_TD.view(*lead, D), plan


MOE_PP = register_preset(
    Preset(
        name="moe_pp",
        router="moe_plus_plus",
        options={"k": 2, "num_zero": 1, "num_copy": 1, "num_constant": 2, "tau": 0.75},
        num_experts=20,
        layer={"activation": "swiglu"},
        loss_coefficients={"load_balance": 0.01},
        papers=("moe-plus-plus",),
        description=(
            "MoE++ (Jin et al., ICLR 2025, arXiv 2410.07348): 16 FFN experts plus 1 zero, 1 copy and 2 "
            "constant experts, top-2 softmax with gating residuals, zero-computation experts weighted "
            "tau = 0.75 in the balance loss. As an impls.MoELayer router the 4 zero-computation ids are "
            "ordinary experts; MoEPlusPlusLayer computes them in closed form."
        ),
        deviations="beta = 0.01 from a secondary summary; dropless (the paper's capacities not modelled).",
    )
)
