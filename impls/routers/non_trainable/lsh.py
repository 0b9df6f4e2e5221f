r"""Locality-sensitive-hashing routing: the sparse model of Baykal et al.'s theoretical view (NeurIPS 2022).

Baykal, Dikkala, Panigrahy, Rashtchian and Wang model a sparsely activated network as
$g(x) = (A \circ \operatorname{mask}(x))\,\varphi(x)$ with an $s$-sparse, input-dependent mask
(Sec. 2.1, "DSM") and study the case in which the mask comes from **locality-sensitive hashing**
(Sec. 2.2): $m$ hash functions $h_j : \mathbb{R}^d \to \{-1, 1\}$ give each input a sign pattern
that selects one of $2^m$ buckets, each with its own function; with $s$ independent hash tables
the output is $\sum_{i=1}^{s} \alpha_i \, \hat g^{\,i}_{z^i(x)}(x)$. Nearby inputs share buckets,
so each bucket's function only has to fit a small region: their upper bounds (Sec. 4) show that
such a model learns Lipschitz functions of inputs on a $k$-dimensional subspace at a cost
logarithmic in the accuracy, where a dense model needs a width exponential in $k$.

As a router over experts: `num_tables` $= s$ tables of $m$ random hyperplanes each
(hyperplane LSH, $h_j(x) = \operatorname{sign}(r_j \cdot x)$, $r_j \sim \mathcal{N}(0, I)$,
Charikar 2002), with $E = s \cdot 2^m$ experts, table $i$ owning experts $[i\,2^m, (i+1)\,2^m)$.
Token $x$ goes to expert $i\,2^m + \sum_j 2^{m-1-j}\,[r_{ij} \cdot x > 0]$ of every table, and the
experts' outputs are summed with weight $1/s$ (the paper's $\alpha_i$, here fixed and equal). The
hyperplanes are drawn once from `seed` and never trained: the rule is non-trainable, and two
tokens at angle $\theta$ land in the same bucket of a table with probability
$(1 - \theta/\pi)^m$.

## Defaults and what is confirmed

The model (sign patterns of $m$ hash functions selecting one of $2^m$ buckets, $s$ tables) is the
paper's Sec. 2.2. The paper names hyperplane LSH as an example of such hashes; its upper bound
(Lemma 4.2) uses Euclidean LSH, $\lfloor (a^\top x + b)/\varepsilon \rfloor$, whose integer bucket
vectors have no fixed mapping to $E$ experts, so it is not offered. The paper's synthetic
experiments train one scalar per bucket on top of fixed hyperplanes; here the experts are
whatever the layer holds.

**Deviations.** The table weights $\alpha_i$ are fixed at $1/s$ (the paper leaves them general).

## Usage

```python
import torch, impls

router = impls.build_router("lsh", d_model=32, num_experts=16)       # 1 table of 4 hyperplanes
plan = router(torch.randn(10, 32))
print(plan.expert_ids_TK[:, 0])                                       # the sign pattern, in binary
router = impls.build_router("lsh", d_model=32, num_experts=16, num_tables=2)   # 2 x 8 buckets
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from impls.plan import RoutingPlan, every_slot_plan
from impls.registry import register_router
from impls.router import RouterConfig
from impls.routers.non_trainable._gateless import GatelessRouter

__all__ = ["LSHConfig", "LSHRouter"]


@dataclass(frozen=True, kw_only=True)
class LSHConfig(RouterConfig):
    """Options of ``LSHRouter``.

    Attributes:
        num_tables: ``s``, independent hash tables; each token gets one expert per table.
        seed: seed of the random hyperplanes.
        k: ignored; the number of experts per token is ``num_tables``.
    """

    num_tables: int = 1
    seed: int = 0

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        s = self.num_tables
        if not isinstance(s, int) or s < 1:
            raise ValueError(f"num_tables must be an int >= 1, got {s!r}")
        per = num_experts // s if num_experts % s == 0 else 0
        if per < 1 or per & (per - 1):
            raise ValueError(
                f"num_experts must be num_tables * 2**m (got num_experts={num_experts}, num_tables={s})"
            )
        if self.has_capacity:
            raise ValueError("LSH routing is dropless; capacity_factor is not supported")
        if self.jitter_eps:
            raise ValueError("LSH routing hashes the token itself; jitter_eps is not supported")


@register_router
class LSHRouter(GatelessRouter):
    """Hyperplane-LSH routing: each of ``s`` tables sends a token to the bucket of its sign pattern.

    Baykal, Dikkala, Panigrahy, Rashtchian, Wang, "A Theoretical View on Sparsely Activated
    Networks", NeurIPS 2022, arXiv 2208.04461: Sec. 2.1 (data-dependent sparse models), Sec. 2.2
    (the LSH model), Sec. 4 (upper bounds).
    """

    name = "lsh"
    papers = ("theoretical-view-2022",)
    causal = True
    Config = LSHConfig
    config: LSHConfig
    fp32_buffers = ("hyperplanes",)

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        cfg = self.config
        self.bits = int(math.log2(num_experts // cfg.num_tables))
        g = torch.Generator().manual_seed(cfg.seed)
        planes = torch.randn(cfg.num_tables, self.bits, d_model, generator=g, dtype=torch.float32)
        self.register_buffer("hyperplanes", planes)

    @property
    def max_experts_per_token(self) -> int:
        return self.config.num_tables

    @property
    def combine_normalization(self) -> float:
        return 1.0

    def buckets(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``long [T, s]``: every table's bucket (the sign pattern read as a binary number)."""
        proj_TSM = torch.einsum("td,smd->tsm", x_TD.float(), self.hyperplanes.float())
        place_M = 2 ** torch.arange(self.bits - 1, -1, -1, device=x_TD.device)
        return ((proj_TSM > 0).long() * place_M).sum(-1)

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        s = self.config.num_tables
        per = self.num_experts // s
        ids_TK = self.buckets(x_TD) + per * torch.arange(s, device=x_TD.device)
        w_TK = torch.full(ids_TK.shape, 1.0 / s, device=x_TD.device)
        scores_TE = torch.zeros_like(logits_TE).scatter_(1, ids_TK, 1.0 / s)
        return every_slot_plan(ids_TK, w_TK, scores_TE, logits_TE, token_mask_T)
