r"""Dropless top-k softmax routing (Mixtral, Jamba, DBRX, JetMoE, Qwen1.5-MoE, Skywork-MoE).

The router of most open MoE language models. Each token's gate logits $h = x W_r$ (no bias)
go through a softmax over all $E$ experts; the $k$ largest probabilities pick the experts and,
renormalized over the chosen ones, become the combine weights:

$$
p = \operatorname{softmax}(h), \qquad
\mathcal{T} = \operatorname{TopK}(p, k), \qquad
g_i = \frac{p_i}{\sum_{j \in \mathcal{T}} p_j} \;\; (i \in \mathcal{T}), \qquad
y = \sum_{i \in \mathcal{T}} g_i \, E_i(x).
$$

Renormalizing after the softmax equals a softmax over the $k$ kept logits ("softmax after
top-k", JetMoE's and Mixtral's reference code): both orders are offered and give the same
weights. Without renormalization (`normalize=False`, Qwen1.5-MoE) the weights are the raw
probabilities and sum to less than one. DBRX divides by the $p$-norm of the kept weights
($p = 1$ is ordinary renormalization).

**Skywork-MoE gating-logit normalization** (Wei et al. 2024, arXiv 2406.06563, Sec. 3.1)
standardizes the logits before the softmax, $\tilde h = \lambda \, (h - \mu(h)) / \sigma(h)$, so
$\lambda$ alone sets how peaked the distribution is (`logit_norm_scale`).

No capacity limit by default (dropless): every token reaches its $k$ experts. Balance comes from
the Switch-style loss computed on this decision, before any capacity,

$$
\mathcal{L}_\text{bal} = E \sum_{i=1}^{E} f_i P_i, \qquad
f_i = \frac{\#\{(t, j) : \text{slot } j \text{ of token } t \text{ chose } i\}}{k \, T}, \qquad
P_i = \frac{1}{T} \sum_t p_{t,i},
$$

which equals $1$ for a perfectly balanced router for every $k$ (Hugging Face's Mixtral code
reports $k$ times this value), and the router z-loss
$\mathcal{L}_z = \frac{1}{T}\sum_t \big(\log\sum_i e^{h_{t,i}}\big)^2$ (ST-MoE eq. 5). Both are
returned unweighted as `load_balance` and `z_loss`; weight them with `plan.aux_loss(...)`.

## Defaults and what is confirmed

| preset | E | k | weights | balance loss weight |
|---|---|---|---|---|
| `mixtral_8x7b` | 8 | 2 | renormalized | 0.02 |
| `jamba` | 16 | 2 | renormalized | 0.001 |
| `dbrx` | 16 | 4 | $p$-norm, $p=1$ | 0.05 |
| `jetmoe` | 8 | 2 | softmax after top-k | 0.01 (z-loss 0.001) |
| `qwen1_5_moe` | 60 | 4 | raw probabilities | 0.001 |
| `skywork_moe` | 16 | 2 | renormalized, logit norm | 0.01 |

Sources: Mixtral — paper and Hugging Face code; the weight 0.02 is the released `config.json`'s
(the paper gives none). Jamba — Hugging Face config; 0.001 is its default. DBRX — HF/vLLM code;
the weight is unconfirmed (MegaBlocks' default is 0.1). JetMoE — HF config (`aux_loss_coef`
0.01); the z-loss weight is unconfirmed. Qwen1.5-MoE — HF config: a shared expert 4x an
expert's width behind a sigmoid gate. Skywork-MoE — $\lambda = 1$ and the weight are
assumptions.

**Deviations.** Skywork-MoE trains with a capacity limit and adapts its auxiliary-loss weight per
layer from the drop rate; the preset is dropless and has one fixed weight (enable capacity with
`capacity_factor=...`). `k = 1` together with renormalization (or softmax after top-k) is
rejected: the only weight would be the constant 1 and the router would get no gradient from
the task loss (a known trap, Megatron-LM refuses it too).

## Usage

```python
import torch, impls

router = impls.build_router("mixtral_8x7b", d_model=32)      # 8 experts, top-2
plan = router(torch.randn(6, 32))
print(plan.expert_ids_TK.shape, plan.weights_TK.sum(-1))      # [6, 2], all ones
loss = plan.aux_loss({"load_balance": 0.02})

layer = impls.MoELayer(32, 64, router="dbrx", activation="swiglu")  # 16 experts, top-4
out, plan = layer(torch.randn(2, 5, 32))
print(out.shape, plan.experts_per_token)
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from impls.functional import load_balance_loss, topk, z_loss
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig

__all__ = ["TopKConfig", "TopKRouter", "standardize_logits", "topk_softmax"]


@dataclass(frozen=True, kw_only=True)
class TopKConfig(RouterConfig):
    """Options of ``TopKRouter``.

    Attributes:
        k: experts per token (default 2).
        softmax_order: ``"before"`` (softmax over all experts, then top-k) or ``"after"`` (top-k
            of the logits, then a softmax over the k kept logits: always normalized).
        normalize: renormalize the kept probabilities (``softmax_order="before"`` only).
        norm_p: the norm used by ``normalize`` (DBRX's ``moe_normalize_expert_weights``; 1 = sum).
        logit_norm_scale: Skywork-MoE's $\\lambda$; ``None`` disables logit normalization.
    """

    k: int = 2
    softmax_order: Literal["before", "after"] = "before"
    normalize: bool = True
    norm_p: float = 1.0
    logit_norm_scale: float | None = None

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.softmax_order not in ("before", "after"):
            raise ValueError(f"softmax_order must be 'before' or 'after', got {self.softmax_order!r}")
        if self.norm_p <= 0:
            raise ValueError(f"norm_p must be > 0, got {self.norm_p}")
        if self.logit_norm_scale is not None and self.logit_norm_scale <= 0:
            raise ValueError(f"logit_norm_scale must be > 0 or None, got {self.logit_norm_scale}")
        if self.k == 1 and (self.softmax_order == "after" or self.normalize):
            raise ValueError(
                "k=1 with normalize=True or softmax_order='after' makes the only weight the constant 1, "
                "so the router gets no gradient from the task loss; use normalize=False (Switch-style)"
            )


def standardize_logits(logits_TE: torch.Tensor, scale: float) -> torch.Tensor:
    """Skywork-MoE gating-logit normalization ``scale * (h - mean) / std`` per token."""
    mean = logits_TE.mean(-1, keepdim=True)
    std = logits_TE.std(-1, keepdim=True, unbiased=False)
    return scale * (logits_TE - mean) / (std + 1e-6)


def topk_softmax(
    logits_TE: torch.Tensor, k: int, *, order: str = "before", normalize: bool = True, p: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probs_TE, expert_ids_TK, weights_TK)`` of softmax top-k routing (float32)."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    if order == "after":
        top_logits, ids = topk(logits_TE, k)
        return probs_TE, ids, torch.softmax(top_logits.float(), dim=-1)
    top_p, ids = topk(probs_TE, k)
    if normalize:
        denom = top_p.sum(-1, keepdim=True) if p == 1.0 else top_p.norm(p=p, dim=-1, keepdim=True)
        top_p = top_p / denom.clamp_min(1e-20)
    return probs_TE, ids, top_p


@register_router
class TopKRouter(Router):
    """Token-choice top-k softmax router, dropless by default.

    Mixtral: Jiang et al., "Mixtral of Experts", 2024, arXiv 2401.04088, Sec. 2.1 (eq. for
    $G(x) = \\operatorname{Softmax}(\\operatorname{TopK}(x W_g))$). Jamba: Lieber et al., 2024,
    arXiv 2403.19887. DBRX: Databricks model release, 2024. JetMoE: Shen et al., 2024,
    arXiv 2404.07413. Qwen1.5-MoE: Qwen team model release, 2024. Skywork-MoE: Wei et al., 2024,
    arXiv 2406.06563, Sec. 3.1 (gating logit normalization). Balance loss: Fedus et al. 2021,
    arXiv 2101.03961, eq. 4-6; z-loss: Zoph et al. 2022, arXiv 2202.08906, eq. 5.
    """

    name = "topk"
    papers = ("mixtral-8x7b", "jamba", "dbrx", "jetmoe", "qwen1-5-moe", "skywork-moe")
    causal = True
    Config = TopKConfig

    @property
    def combine_normalization(self) -> float | str | None:
        cfg = self.config
        if cfg.softmax_order == "after" or (cfg.normalize and cfg.norm_p == 1.0):
            return 1.0
        return "at_most_one" if not cfg.normalize else None

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        cfg = self.config
        h_TE = logits_TE
        if cfg.logit_norm_scale is not None:
            h_TE = standardize_logits(logits_TE, cfg.logit_norm_scale)
        probs_TE, ids_TK, w_TK = topk_softmax(
            h_TE, cfg.k, order=cfg.softmax_order, normalize=cfg.normalize, p=cfg.norm_p
        )
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        losses = {
            "load_balance": load_balance_loss(probs_TE, ids_TK, token_mask_T),
            "z_loss": z_loss(h_TE, token_mask_T),
        }
        return RoutingPlan(ids_TK, w_TK, keep_TK, probs_TE, logits_TE, losses, token_mask_T)


_SWIGLU = {"activation": "swiglu"}

MIXTRAL_8X7B = register_preset(
    Preset(
        name="mixtral_8x7b",
        router="topk",
        options={"k": 2},
        num_experts=8,
        layer=_SWIGLU,
        loss_coefficients={"load_balance": 0.02},
        papers=("mixtral-8x7b",),
        description=(
            "Mixtral 8x7B (Jiang et al. 2024, arXiv 2401.04088): 8 experts, top-2, renormalized, dropless."
        ),
        deviations="Loss weight 0.02 is the released config.json value; the paper states none.",
    )
)
JAMBA = register_preset(
    Preset(
        name="jamba",
        router="topk",
        options={"k": 2, "normalize": False},
        num_experts=16,
        layer=_SWIGLU,
        loss_coefficients={"load_balance": 0.001},
        papers=("jamba",),
        description=(
            "Jamba (Lieber et al. 2024, arXiv 2403.19887): 16 experts, top-2 of the softmax, combined "
            "with the raw probabilities (no renormalization, as in the released modeling code)."
        ),
        deviations="Loss weight 0.001 is the Hugging Face default, not confirmed in the paper.",
    )
)
DBRX = register_preset(
    Preset(
        name="dbrx",
        router="topk",
        options={"k": 4, "norm_p": 1.0},
        num_experts=16,
        layer=_SWIGLU,
        loss_coefficients={"load_balance": 0.05},
        papers=("dbrx",),
        description=(
            "DBRX (Databricks 2024 model release): 16 fine-grained experts, top-4, p-norm (p=1) weights."
        ),
        deviations="No paper; the loss weight 0.05 is unconfirmed (MegaBlocks' default is 0.1).",
    )
)
JETMOE = register_preset(
    Preset(
        name="jetmoe",
        router="topk",
        options={"k": 2, "softmax_order": "after"},
        num_experts=8,
        layer=_SWIGLU,
        loss_coefficients={"load_balance": 0.01, "z_loss": 0.001},
        papers=("jetmoe",),
        description=(
            "JetMoE (Shen et al. 2024, arXiv 2404.07413): 8 experts, top-2, softmax over the kept logits."
        ),
        deviations=(
            "Only the MLP mixture is modelled (JetMoE also routes attention heads); "
            "the z-loss weight 0.001 is unconfirmed."
        ),
    )
)
QWEN1_5_MOE = register_preset(
    Preset(
        name="qwen1_5_moe",
        router="topk",
        options={"k": 4, "normalize": False},
        num_experts=60,
        layer={"activation": "swiglu", "num_shared_experts": 4, "shared_expert_gate": True},
        loss_coefficients={"load_balance": 0.001},
        papers=("qwen1-5-moe",),
        description=(
            "Qwen1.5-MoE-A2.7B (Qwen team 2024 model release): 60 experts, top-4 raw probabilities, "
            "a shared expert 4x an expert's width behind a sigmoid gate."
        ),
        deviations="No paper; values from the released Hugging Face config.",
    )
)
SKYWORK_MOE = register_preset(
    Preset(
        name="skywork_moe",
        router="topk",
        options={"k": 2, "logit_norm_scale": 1.0},
        num_experts=16,
        layer=_SWIGLU,
        loss_coefficients={"load_balance": 0.01},
        papers=("skywork-moe",),
        description=(
            "Skywork-MoE (Wei et al. 2024, arXiv 2406.06563): 16 experts, top-2, gating-logit normalization."
        ),
        deviations=(
            "lambda = 1 and the loss weight are assumptions; the paper's capacity limit and per-layer "
            "adaptive loss weights are not modelled (dropless, fixed weight)."
        ),
    )
)
