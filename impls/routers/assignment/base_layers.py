r"""BASE layers: an exact balanced assignment gives every expert the same number of tokens.

Lewis, Bhosale, Dettmers, Goyal & Zettlemoyer, "BASE Layers: Simplifying Training of Large, Sparse
Models", ICML 2021 (arXiv:2103.16716). During training, routing is a **linear assignment
problem**: every expert receives exactly the same number of tokens and the total token–expert
affinity is maximal, so no auxiliary loss and no capacity factor are needed and no token is
dropped. At test time each token simply goes to its highest-affinity expert.

With $x_t$ the token, $w_e$ the expert's centroid (the rows of the gate weight) and
$a_{te} = x_t^\top w_e$:

$$
\max_{\alpha \in \{0,1\}^{T \times E}} \sum_{t,e} \alpha_{te}\, a_{te}
\quad\text{s.t.}\quad \sum_e \alpha_{te} = 1,\qquad \sum_t \alpha_{te} = \tfrac{T}{E}.
$$

The expert output is mixed with the input by a sigmoid gate (paper §2, fairseq ``BaseLayer``):

$$
y_t = \sigma(x_t^\top w_{e(t)})\, f_{e(t)}(x_t) + \bigl(1 - \sigma(x_t^\top w_{e(t)})\bigr)\, x_t ,
$$

where fairseq's expert $f_e(x) = x + \mathrm{FFN}_e(\mathrm{LN}(x))$ has its own residual, so
$y_t = x_t + \sigma(a_{t,e(t)})\,\mathrm{FFN}_{e(t)}(\mathrm{LN}(x_t))$. This router therefore
returns **combine weight $\sigma(a_{t,e(t)})$**; the transformer block's residual supplies the
$x_t$ term (with a pre-norm FFN as the expert the output is exactly the formula above). The
assignment itself has no gradient (fairseq computes the affinities under ``no_grad``); the gate
weights learn through $\sigma(a)$.

**Solver.** `impls.ops.auction.balanced_assignment`: a reverse auction (experts bid for tokens)
sets near-optimal expert prices in a few sync-free steps, a forward auction (tokens bid for
experts) assigns the tokens at those prices, and an exact repair cancels negative cycles of the
expert-level residual graph until none is left, which certifies optimality
(`info["assignment_optimal"]`). Host syncs: one per forward-auction round (two by default), one
per greedy-fill pass and one per cycle search (a handful; the last one certifies). fairseq's C++
auction instead uses ε = range/50 and switches to an approximation after 100 rounds, so its
assignment is not exactly optimal; this one is (tested against SciPy's ``linear_sum_assignment``
on the expanded matrix).

**Uneven batches.** fairseq requires ``T`` divisible by the number of experts. Here, with $T'$
valid (non-padding) tokens, every expert gets $\lfloor T'/E \rfloor$ tokens and the **first**
$T' \bmod E$ experts one more (so $T' < E$ leaves the last experts empty). Padding tokens are not
assigned (``keep`` false).

**Deviations.** fairseq first shuffles tokens randomly across workers and solves one assignment
per worker over its shard; here one assignment is solved over the routed batch (the single-worker
case). Centroids are initialized orthogonally with gain 0.1 as in fairseq (`orthogonal_init`).
Inference is greedy top-1 as in the paper (`eval_routing="greedy"`); `"balanced"` keeps the
assignment at inference (not causal). `causal = True` refers to the greedy inference path — in
training every token's expert depends on the whole batch.

## Usage

```python
import torch, impls

router = impls.build_router("base_layers", d_model=32, num_experts=4)
plan = router(torch.randn(10, 32))           # 10 tokens, 4 experts: loads 3, 3, 2, 2
print(plan.expert_load, plan.info["assignment_optimal"])
weights = plan.weights_TK                      # sigmoid(affinity) of the assigned expert
router.eval()
print(router(torch.randn(10, 32)).expert_ids_TK.squeeze(1))   # greedy top-1
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from impls.ops.auction import balanced_assignment
from impls.plan import every_slot_plan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig


@dataclass(frozen=True, kw_only=True)
class BaseLayersConfig(RouterConfig):
    """BASE-layer options (``k`` must be 1).

    Attributes:
        orthogonal_init: initialize the expert centroids orthogonally with gain 0.1 (fairseq).
        eval_routing: ``"greedy"`` top-1 (paper) or ``"balanced"`` (the assignment at inference).
        auction_eps: forward-auction ε on affinities rescaled to [0, 1] (the exact repair makes
            the final assignment optimal for any ε; ε only trades auction work against repairs).
        max_rounds: cap on forward-auction rounds before the greedy fill and the repair.
        max_repairs: cap on cancelled cycles; ``None`` = ``10 * E``.
        price_steps: reverse-auction steps that set the opening prices.
        price_damping: step size of the price steps after the first, in ``(0, 1]``.
    """

    orthogonal_init: bool = True
    eval_routing: Literal["greedy", "balanced"] = "greedy"
    auction_eps: float = 1e-3
    max_rounds: int = 2
    max_repairs: int | None = None
    price_steps: int = 8
    price_damping: float = 0.5

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.k != 1:
            raise ValueError(f"k must be 1 for BASE layers (one expert per token), got k={self.k}")
        if self.eval_routing not in ("greedy", "balanced"):
            raise ValueError(f"eval_routing must be 'greedy' or 'balanced', got {self.eval_routing!r}")
        if not self.auction_eps > 0:
            raise ValueError(f"auction_eps must be > 0, got {self.auction_eps}")
        if self.max_rounds < 0:
            raise ValueError(f"max_rounds must be >= 0, got {self.max_rounds}")
        if self.max_repairs is not None and self.max_repairs < 0:
            raise ValueError(f"max_repairs must be >= 0 or None, got {self.max_repairs}")
        if self.price_steps < 0:
            raise ValueError(f"price_steps must be >= 0, got {self.price_steps}")
        if not 0.0 < self.price_damping <= 1.0:
            raise ValueError(f"price_damping must be in (0, 1], got {self.price_damping}")


@register_router
class BalancedAssignmentRouter(Router):
    """Exact balanced token-expert assignment with sigmoid mixing (Lewis et al., "BASE Layers:
    Simplifying Training of Large, Sparse Models", ICML 2021, arXiv:2103.16716)."""

    nonfinite_sync = True  # syncs with the host anyway; see impls.router

    name = "balanced_assignment"
    papers = ("base-layers",)
    causal = True
    balanced_by_construction = True
    Config = BaseLayersConfig
    config: BaseLayersConfig

    @property
    def is_causal(self) -> bool:
        if self.training or self.config.eval_routing == "balanced":
            return False  # the assignment couples all tokens of the batch
        return super().is_causal

    @property
    def compile_break(self) -> str | None:
        if not (self.training or self.config.eval_routing == "balanced"):
            return None
        return (
            "the exact balanced assignment (auction with epsilon scaling) runs until every token is "
            "assigned, a stopping test read on the host"
        )

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        if self.config.orthogonal_init:
            with torch.no_grad():
                torch.nn.init.orthogonal_(self.gate.weight, gain=0.1)

    def route(self, logits_TE, x_TD, token_mask_T):
        cfg = self.config
        info: dict[str, Any] = {}
        if self.training or cfg.eval_routing == "balanced":
            res = balanced_assignment(
                logits_TE.detach(),
                token_mask_T=token_mask_T,
                eps=cfg.auction_eps,
                max_rounds=cfg.max_rounds,
                max_repairs=cfg.max_repairs,
                price_steps=cfg.price_steps,
                price_damping=cfg.price_damping,
            )
            expert_T = res.expert_T.clamp_min(0)
            info = {
                "assignment_rounds": res.rounds,
                "assignment_repairs": res.repairs,
                "assignment_searches": res.searches,
                "assignment_optimal": res.optimal,
            }
        else:
            expert_T = logits_TE.detach().argmax(-1)
        ids_TK = expert_T[:, None]
        scores_TE = logits_TE.sigmoid()
        w_TK = scores_TE.gather(1, ids_TK)
        return every_slot_plan(ids_TK, w_TK, scores_TE, logits_TE, token_mask_T, info=info)


BASE_LAYERS = register_preset(
    Preset(
        name="base_layers",
        router="balanced_assignment",
        options={"k": 1, "eval_routing": "greedy"},
        papers=("base-layers",),
        description="BASE layers: exact balanced assignment in training, greedy top-1 at test time "
        "(Lewis et al. 2021, arXiv:2103.16716).",
        deviations="One assignment over the routed batch instead of fairseq's per-worker assignment after a "
        "random shuffle; the assignment is exactly optimal (fairseq's auction is approximate).",
    )
)
