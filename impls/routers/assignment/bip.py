r"""BIP-based balancing: per-expert dual corrections from the routing LP steer which experts tokens pick.

Yuan Sun, "Binary-Integer-Programming Based Algorithm for Expert Load Balancing in
Mixture-of-Experts Models", 2025 (arXiv:2502.15451). Routing of $n$ tokens to $m$ experts with
scores $s_{ij}$ is cast as a binary integer program,

$$
\max_{x \in \{0,1\}^{n \times m}} \sum_{i,j} s_{ij} x_{ij}
\quad\text{s.t.}\quad \sum_j x_{ij} \le k, \qquad \sum_i x_{ij} \le \frac{k n}{m},
$$

and each MoE layer keeps a vector $q \in \mathbb{R}^m$ of dual variables of the expert
constraints, computed from the LP relaxation with a few iterations per batch. Tokens then take the
top-$k$ experts of $s_{ij} - q_j$; **$q$ changes the selection only**, the combine weights come
from the original scores $s$. No auxiliary loss is used.

**The update.** The dual of the LP relaxation (with $x_{ij} \le 1$) is

$$
\min_{p, q, r \ge 0}\; k \sum_i p_i + C \sum_j q_j + \sum_{ij} r_{ij}
\quad\text{s.t.}\quad p_i + q_j + r_{ij} \ge s_{ij},
$$

with $C = \lceil k n / m \rceil$. Minimizing exactly over one block with the other fixed gives
closed forms, and alternating them is the iteration used here:

$$
p_i \leftarrow \max\bigl(0,\ (k{+}1)\text{-th largest}_j\,(s_{ij} - q_j)\bigr), \qquad
q_j \leftarrow \max\bigl(0,\ (C{+}1)\text{-th largest}_i\,(s_{ij} - p_i)\bigr).
$$

Complementary slackness then routes token $i$ to the experts with $s_{ij} - q_j > p_i$, i.e. its
top-$k$ of $s - q$. This matches the paper's description (per-token $p_i$, per-expert $q_j$,
$T$ iterations per batch, selection by $s - q$, $q$ kept per layer); the exact form of the paper's
update could not be read and is derived here from the LP, so it is documented rather than
confirmed. $q$ is a buffer: warm-started from the previous batch, updated (without gradient)
only in training mode, kept in float32 even if the module is cast to bf16, and used unchanged at
inference.

Defaults: softmax scores (the paper's Minimind models use a softmax gate); `bip_iters = 4`
(the paper's $T$ is not confirmed); combine weights renormalized over the $k$ choices when
$k > 1$ (`renormalize`). Padding tokens take no part in the dual iterations; with a padding
mask the valid-token count $n$ is read once per training batch (one host sync). In training the
corrections come from the batch itself, so `is_causal` is False there; at inference $q$ is fixed
and routing is per token.

## Usage

```python
import torch, impls

router = impls.build_router("bip_balancing", d_model=32, num_experts=16, k=2)
x = torch.randn(256, 32)
plan = router(x)                 # training: updates q from this batch, selects top-2 of s - q
print(plan.expert_load)          # close to 256 * 2 / 16 = 32 per expert
print(router.q)                  # the per-expert corrections (float32 buffer)
router.eval()
plan = router(x)                 # inference: q fixed
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from impls.functional import topk
from impls.plan import every_slot_plan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig


@dataclass(frozen=True, kw_only=True)
class BIPConfig(RouterConfig):
    """BIP-balancing options.

    Attributes:
        score_fn: ``"softmax"`` or ``"sigmoid"`` scores ``s``.
        bip_iters: dual iterations per training batch (the paper's ``T``; unconfirmed default).
        renormalize: renormalize the combine weights over the ``k`` choices; ``None`` = when ``k > 1``.
        warm_start: start each batch's iterations from the stored ``q`` (else from zero).
    """

    score_fn: Literal["softmax", "sigmoid"] = "softmax"
    bip_iters: int = 4
    renormalize: bool | None = None
    warm_start: bool = True

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.score_fn not in ("softmax", "sigmoid"):
            raise ValueError(f"score_fn must be 'softmax' or 'sigmoid', got {self.score_fn!r}")
        if self.bip_iters < 1:
            raise ValueError(f"bip_iters must be >= 1, got {self.bip_iters}")


def _kth_largest(x: torch.Tensor, kth: int, dim: int) -> torch.Tensor:
    """The ``kth`` largest entry along ``dim`` (1-based), ``-inf`` when there are fewer entries."""
    n = x.shape[dim]
    if kth > n:
        shape = list(x.shape)
        shape.pop(dim)
        return x.new_full(shape, -math.inf)
    return x.topk(kth, dim=dim).values.select(dim, kth - 1)


def bip_duals(
    s_TE: torch.Tensor, k: int, q_E: torch.Tensor, iters: int, token_mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Block-coordinate descent on the dual of the routing LP; returns the expert duals ``q``.

    With a padding mask, the number of valid tokens is read once (one host sync).
    """
    T, E = s_TE.shape
    n = T if token_mask_T is None else int(token_mask_T.sum())
    s = s_TE if token_mask_T is None else s_TE.masked_fill(~token_mask_T[:, None], -math.inf)
    cap = math.ceil(k * n / E)  # C = ceil(k n / m)
    q = q_E.to(s.dtype)
    for _ in range(iters):
        p = _kth_largest(s - q, k + 1, dim=1).clamp_min(0)
        q = _kth_largest(s - p[:, None], cap + 1, dim=0).clamp_min(0)
    return q


@register_router
class BIPRouter(Router):
    """Top-k of scores minus LP dual corrections (Yuan Sun, "Binary-Integer-Programming Based
    Algorithm for Expert Load Balancing in Mixture-of-Experts Models", 2025, arXiv:2502.15451)."""

    nonfinite_sync = True  # syncs with the host anyway; see impls.router

    name = "bip"
    papers = ("bip-load-balancing",)
    causal = True
    Config = BIPConfig
    config: BIPConfig
    fp32_buffers = ("q",)

    @property
    def is_causal(self) -> bool:
        return not self.training and super().is_causal  # training updates q from the whole batch

    @property
    def combine_normalization(self) -> float | str | None:
        cfg = self.config
        if (cfg.k > 1) if cfg.renormalize is None else cfg.renormalize:
            return 1.0
        return "at_most_one" if cfg.score_fn == "softmax" else None

    @property
    def compile_break(self) -> str | None:
        if not self.training:
            return None
        return (
            "the dual update's capacity ceil(k n / E) takes the top-(capacity + 1) over the n valid "
            "tokens, a count read on the host whenever a token mask is given (compiled, always)"
        )

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        self.register_buffer("q", torch.zeros(num_experts, dtype=torch.float32))

    def route(self, logits_TE, x_TD, token_mask_T):
        cfg = self.config
        s_TE = logits_TE.softmax(-1) if cfg.score_fn == "softmax" else logits_TE.sigmoid()
        if self.training:
            with torch.no_grad():
                q0 = self.q if cfg.warm_start else torch.zeros_like(self.q)
                self.q.copy_(bip_duals(s_TE.detach(), cfg.k, q0, cfg.bip_iters, token_mask_T))
        q = self.q.clone()
        ids_TK = topk(s_TE.detach() - q, cfg.k)[1]
        w_TK = s_TE.gather(1, ids_TK)
        renorm = cfg.k > 1 if cfg.renormalize is None else cfg.renormalize
        if renorm:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(w_TK.dtype).tiny)
        return every_slot_plan(ids_TK, w_TK, s_TE, logits_TE, token_mask_T, info={"bip_q": q})


BIP_BALANCING = register_preset(
    Preset(
        name="bip_balancing",
        router="bip",
        options={"score_fn": "softmax", "bip_iters": 4},
        papers=("bip-load-balancing",),
        description="BIP-based balancing: top-k of softmax scores minus LP dual corrections (Sun 2025, "
        "arXiv:2502.15451).",
        deviations="Dual update derived from the LP relaxation (block coordinate descent); the paper's exact "
        "update and its iteration count T are unconfirmed.",
    )
)
