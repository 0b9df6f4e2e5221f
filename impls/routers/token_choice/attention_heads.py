r"""Routing over attention heads: MoA (Zhang et al., EMNLP 2022) and MoH (Jin et al., ICML 2025).

Multi-head attention is already a sum over heads: splitting the output projection by rows,
$\operatorname{MultiHead}(X) = \sum_{i=1}^{h} H_i W_O^i$ with $H_i = \operatorname{Attn}(X W_Q^i,
X W_K^i, X W_V^i)$ (MoH, Eq. 3). Both methods treat the heads as experts and let each token use
only some of them, weighted.

**MoA** (Mixture of Attention Heads, Zhang et al. 2022): $E$ head-experts, each with its own
query and output projections, **sharing one key and one value projection**; a token's top-$k$
experts by $p = \operatorname{softmax}(x W_g)$ (raw probabilities, not renormalized; $W_g$
starts at zero) give

$$
y_t = \sum_{i \in \operatorname{TopK}(p_t)} p_{t,i}\, \operatorname{Attn}(x_t W_Q^i, X W_K, X W_V)\, W_O^i,
$$

with the Switch balance loss and the router z-loss (weights 0.01 and 0.001 in the released code).

**MoH** (Mixture-of-Head attention, Jin et al. 2024): ordinary heads (own $W_Q^i, W_K^i, W_V^i$),
of which the first $h_s$ are **shared** (always on) and the other $h - h_s$ **routed** (top-$K$).
MoH$(X) = \sum_i g_i H_i W_O^i$ (Eq. 4) with the two-stage weights of Eq. 5-6,

$$
g_i = \begin{cases}
\alpha_1 \operatorname{softmax}(W_s x_t)_i & i \le h_s \\
\alpha_2 \operatorname{softmax}(W_r x_t)_{i - h_s} & \text{routed head } i \text{ in the top-}K \\
0 & \text{otherwise}
\end{cases}, \qquad [\alpha_1, \alpha_2] = \operatorname{softmax}(W_h x_t),
$$

and the balance loss over the routed heads $\mathcal{L}_b = \sum_i P_i f_i$ (Eq. 7), weighted by
$\beta = 0.01$ (Eq. 8).

Each method is a router (`moa`, `moh`: a `RoutingPlan` over the head-experts, usable by the
contract tests and diagnostics) plus the attention module it drives:
`MixtureOfAttentionHeads(d_model, num_experts, head_dim, k)` and
`MixtureOfHeadsAttention(d_model, num_heads, shared_heads, k)`. Both take `[batch, seq, D]` and
`causal=True` for decoders, and accept explicit per-token head weights (`head_weights=`), so
that with every head at weight 1 they are exactly multi-head attention on the same weights: MoH
equals `torch.nn.MultiheadAttention`, MoA equals multi-head attention whose heads share one key
and value projection (multi-query attention).

## Defaults and what is confirmed

MoA, from its official code (the paper's text was not read here): zero-initialized gate, raw
top-$k$ probabilities, balance 0.01 and z-loss 0.001; the WMT14 script uses $E = 8$, $k = 8$,
head dimension 128. MoH, from the paper (Eq. 3-8) and its code: bias-free routers, routing on
the attention input, $\beta = 0.01$; e.g. MoH-ViT-B-75's third stage has 16 heads, 4 shared,
top-8 routed.

**Deviations.** MoH's released code rescales the gates (routed weights renormalized over the
top-$K$ and multiplied by $K$, shared by $h_s$, $\alpha$ by 2) so that a uniform router gives
every active head weight 1, and multiplies the loss by the number of routed heads; this module
follows the paper's Eq. 5-7 (`code_scaling=True` gives the released form). MoA's fairseq loss
is additionally divided by the token count through fairseq's gradient normalization; not
modelled. No dropout, no positional encoding (the caller's).

## Usage

```python
import torch
from impls.routers.token_choice.attention_heads import MixtureOfHeadsAttention

attn = MixtureOfHeadsAttention(64, num_heads=8, shared_heads=2, k=4)
y, plan = attn(torch.randn(2, 10, 64), causal=True)
loss = y.pow(2).mean() + 0.01 * plan.losses["load_balance"]
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from impls.functional import masked_mean, topk, z_loss
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig
from impls.routers.token_choice.switch import SwitchConfig, SwitchRouter

__all__ = [
    "MixtureOfAttentionHeads",
    "MixtureOfHeadsAttention",
    "MoAConfig",
    "MoARouter",
    "MoHConfig",
    "MoHRouter",
    "head_attention",
]


def head_attention(
    q_BHLC: torch.Tensor, k_BHLC: torch.Tensor, v_BHLC: torch.Tensor, causal: bool
) -> torch.Tensor:
    """Scaled dot-product attention per head (``[B, H, L, C]``; keys/values broadcast over heads)."""
    return nn.functional.scaled_dot_product_attention(q_BHLC, k_BHLC, v_BHLC, is_causal=causal)


# ---------------------------------------------------------------------------------- MoA
@dataclass(frozen=True, kw_only=True)
class MoAConfig(SwitchConfig):
    """Options of ``MoARouter``: Switch's, with top-``k`` = 2 and the gate started at zero."""

    k: int = 2
    zero_init: bool = True


@register_router
class MoARouter(SwitchRouter):
    """MoA's head router: Switch's softmax top-k with raw probabilities, balance and z-losses.

    Zhang, Shen, Liu, Liu, Ding, Wang, "Mixture of Attention Heads: Selecting Attention Heads Per
    Token", EMNLP 2022, arXiv 2210.05144.
    """

    name = "moa"
    papers = ("moa",)
    Config = MoAConfig


def _dense_weights(plan: RoutingPlan, shape: tuple[int, ...]) -> torch.Tensor:
    """``[T, E]`` weights of a plan (zero for experts a token did not select)."""
    T, E = plan.num_tokens, plan.num_experts
    w = torch.zeros(T, E, device=plan.weights_TK.device, dtype=plan.weights_TK.dtype)
    w = w.scatter_add(1, plan.expert_ids_TK.clamp_min(0), plan.weights_TK * plan.keep_TK)
    return w.view(*shape, E)


class MixtureOfAttentionHeads(nn.Module):
    """MoA attention: per-expert query/output projections, one shared key/value projection, top-k heads."""

    def __init__(self, d_model: int, num_experts: int, head_dim: int, k: int = 2, **router_options: Any):
        super().__init__()
        self.d_model, self.num_experts, self.head_dim = d_model, num_experts, head_dim
        self.router = MoARouter(d_model, num_experts, k=k, **router_options)
        self.q_proj = nn.Parameter(torch.empty(num_experts, d_model, head_dim))  # W_Q^i
        self.o_proj = nn.Parameter(torch.empty(num_experts, head_dim, d_model))  # W_O^i
        self.k_proj = nn.Linear(d_model, head_dim)
        self.v_proj = nn.Linear(d_model, head_dim)
        bound = d_model**-0.5
        nn.init.uniform_(self.q_proj, -bound, bound)
        nn.init.uniform_(self.o_proj, -(head_dim**-0.5), head_dim**-0.5)

    def forward(
        self, x_BLD: torch.Tensor, *, causal: bool = False, head_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RoutingPlan]:
        """``(y [B, L, D], plan)``; ``head_weights [B, L, E]`` replaces the router's weights when given."""
        B, L, _ = x_BLD.shape
        plan = self.router(x_BLD)
        w_BLE = _dense_weights(plan, (B, L)) if head_weights is None else head_weights
        q_BELC = torch.einsum("bld,edc->belc", x_BLD, self.q_proj)
        k_B1LC = self.k_proj(x_BLD)[:, None]
        v_B1LC = self.v_proj(x_BLD)[:, None]
        h_BELC = head_attention(q_BELC, k_B1LC.expand_as(q_BELC), v_B1LC.expand_as(q_BELC), causal)
        # every head is computed here (dense reference); the weights zero the unselected ones
        y_BLD = torch.einsum("belc,ecd,ble->bld", h_BELC, self.o_proj, w_BLE.to(h_BELC.dtype))
        return y_BLD, plan


# ---------------------------------------------------------------------------------- MoH
@dataclass(frozen=True, kw_only=True)
class MoHConfig(RouterConfig):
    """Options of ``MoHRouter`` (its experts are the routed heads).

    Attributes:
        k: routed heads per token (top-K).
        shared_heads: heads always on (``h_s``); they get the shared-head weights.
        code_scaling: the released code's gate scaling (see the module docstring) instead of Eq. 5-7.
    """

    k: int = 2
    shared_heads: int = 0
    code_scaling: bool = False

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if not isinstance(self.shared_heads, int) or self.shared_heads < 0:
            raise ValueError(f"shared_heads must be an int >= 0, got {self.shared_heads!r}")


@register_router
class MoHRouter(Router):
    """MoH's two-stage head router: shared heads, top-K routed heads, a softmax between the two groups.

    Jin, Zhu, Yan, Yuan, "MoH: Multi-Head Attention as Mixture-of-Head Attention", ICML 2025,
    arXiv 2410.11842 (Sec. 3.2, Eq. 4-8).
    """

    name = "moh"
    papers = ("moh",)
    causal = True
    Config = MoHConfig
    config: MoHConfig

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        h_s = self.config.shared_heads
        self.shared_gate = nn.Linear(d_model, h_s, bias=False, dtype=torch.float32) if h_s else None  # W_s
        self.group_gate = nn.Linear(d_model, 2, bias=False, dtype=torch.float32) if h_s else None  # W_h

    @property
    def combine_normalization(self) -> None:
        return None

    def shared_weights(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``[T, h_s]``: the shared heads' ``alpha_1 softmax(W_s x)`` (Eq. 5, first case)."""
        cfg = self.config
        if not cfg.shared_heads:
            return x_TD.new_zeros(x_TD.shape[0], 0)
        x = x_TD.float()
        alpha_T2 = torch.softmax(nn.functional.linear(x, self.group_gate.weight.float()), -1)
        s = torch.softmax(nn.functional.linear(x, self.shared_gate.weight.float()), -1)
        if cfg.code_scaling:
            return 2 * alpha_T2[:, :1] * cfg.shared_heads * s
        return alpha_T2[:, :1] * s

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        cfg = self.config
        probs_TE = torch.softmax(logits_TE, dim=-1)
        p_TK, ids_TK = topk(probs_TE, cfg.k)
        if cfg.shared_heads:
            alpha2_T1 = torch.softmax(nn.functional.linear(x_TD, self.group_gate.weight.float()), -1)[:, 1:]
        else:
            alpha2_T1 = torch.ones_like(p_TK[:, :1])
        if cfg.code_scaling:
            w_TK = 2 * alpha2_T1 * cfg.k * p_TK / p_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        else:
            w_TK = alpha2_T1 * p_TK
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        counts_E = torch.zeros_like(probs_TE).scatter(1, ids_TK, 1.0)
        f_E = masked_mean(counts_E, token_mask_T)
        balance = (masked_mean(probs_TE, token_mask_T) * f_E).sum()  # Eq. 7
        if cfg.code_scaling:
            balance = balance * self.num_experts
        losses = {"load_balance": balance, "z_loss": z_loss(logits_TE, token_mask_T)}
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        return RoutingPlan(ids_TK, w_TK, keep_TK, probs_TE, logits_TE, losses, token_mask_T)


class MixtureOfHeadsAttention(nn.Module):
    """MoH attention: ``h`` ordinary heads, ``shared_heads`` always on, top-``k`` of the others routed.

    Its projections are laid out as ``torch.nn.MultiheadAttention``'s (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), so weights load from one into the other.
    """

    def __init__(
        self, d_model: int, num_heads: int, shared_heads: int = 0, k: int = 1, **router_options: Any
    ):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        if not 0 <= shared_heads < num_heads:
            raise ValueError(f"shared_heads must be in [0, num_heads={num_heads}), got {shared_heads}")
        self.d_model, self.num_heads, self.shared_heads = d_model, num_heads, shared_heads
        self.router = MoHRouter(
            d_model, num_heads - shared_heads, k=k, shared_heads=shared_heads, **router_options
        )
        ref = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.in_proj_weight = nn.Parameter(ref.in_proj_weight.detach().clone())
        self.in_proj_bias = nn.Parameter(ref.in_proj_bias.detach().clone())
        self.out_proj = nn.Linear(d_model, d_model)
        self.out_proj.load_state_dict(ref.out_proj.state_dict())

    def gates(self, x_BLD: torch.Tensor) -> tuple[torch.Tensor, RoutingPlan]:
        """``(g [B, L, h], plan)``: shared heads first, then the routed heads (zero where unselected)."""
        B, L, _ = x_BLD.shape
        plan = self.router(x_BLD)
        routed = _dense_weights(plan, (B, L))
        shared = self.router.shared_weights(x_BLD.reshape(B * L, -1)).view(B, L, -1)
        return torch.cat([shared.to(routed.dtype), routed], dim=-1), plan

    def forward(
        self, x_BLD: torch.Tensor, *, causal: bool = False, head_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RoutingPlan]:
        """``(y [B, L, D], plan)``; ``head_weights [B, L, h]`` replaces the gates when given (Eq. 4)."""
        B, L, D = x_BLD.shape
        H, C = self.num_heads, D // self.num_heads
        g_BLH, plan = self.gates(x_BLD)
        if head_weights is not None:
            g_BLH = head_weights
        qkv = nn.functional.linear(x_BLD, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (t.view(B, L, H, C).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        h_BHLC = head_attention(q, k, v, causal)
        h_BLHC = h_BHLC.transpose(1, 2) * g_BLH[..., None].to(h_BHLC.dtype)
        return self.out_proj(h_BLHC.reshape(B, L, D)), plan


MOA_WMT14 = register_preset(
    Preset(
        name="moa_wmt14",
        router="moa",
        options={"k": 8},
        num_experts=8,
        loss_coefficients={"load_balance": 0.01, "z_loss": 0.001},
        papers=("moa",),
        description=(
            "MoA (Zhang et al., EMNLP 2022, arXiv 2210.05144), released WMT14 script: 8 head-experts, all "
            "8 selected per token (the router only weights them), head dimension 128."
        ),
        deviations="Values from the official WMT14 script; the paper's other settings were not read.",
    )
)
MOH_VIT_B_75 = register_preset(
    Preset(
        name="moh_vit_b_75",
        router="moh",
        options={"k": 8, "shared_heads": 4},
        num_experts=12,
        loss_coefficients={"load_balance": 0.01},
        papers=("moh",),
        description=(
            "MoH-ViT-B-75 (Jin et al., ICML 2025, arXiv 2410.11842), third stage: 16 heads, 4 shared, "
            "top-8 of "
            "the 12 routed heads, beta = 0.01."
        ),
        deviations="Paper's gates (Eq. 5-7); the released code rescales them (code_scaling=True).",
    )
)
