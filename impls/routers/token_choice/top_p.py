r"""Dynamic top-p routing: each token takes the fewest experts whose probabilities reach $p$.

Huang et al. (2024) let the number of experts vary per token. With router probabilities
$P = \operatorname{softmax}(x W_r)$ sorted in decreasing order, $P_{(1)} \ge P_{(2)} \ge \dots$,
a token uses the smallest set of top experts whose cumulative probability exceeds the threshold
$p$:

$$
t = \min\Big\{ k : \sum_{j \le k} P_{(j)} \ge p \Big\}, \qquad
y = \sum_{j \le t} P_{(j)} \, E_{(j)}(x).
$$

Confident tokens (one dominant expert) use one expert; uncertain ("harder") tokens use more. The
combine weights are the kept probabilities, not renormalized. Tie rule, as in the official code:
experts are kept up to and including the first whose cumulative probability is strictly above
$p$ (so $\sum_{j < t} P_{(j)} \le p$).

To stop the router from spreading probability to buy more experts, the paper adds a *dynamic
loss* that minimizes the entropy of each token's routing distribution,

$$
\mathcal{L}_d = -\frac{1}{T} \sum_t \sum_{i=1}^{E} P_{t,i} \log P_{t,i},
$$

next to the usual Switch-style balance loss $E \sum_i f_i P_i$ over the selected experts.
They are returned unweighted as `entropy` and `load_balance`.

The plan has `max_k` slots (all $E$ by default); unused slots are `-1`. With a smaller `max_k`
a token whose nucleus is larger keeps its `max_k` best experts (a cap the paper does not have).

## Defaults and what is confirmed

`top_p_threshold` $p = 0.4$ is the official configuration (confirmed in the released code); the
loss weights of the released training scripts are not confirmed here (the preset uses 0.01 for
the balance loss and 1e-4 for the dynamic loss: assumptions).

## Usage

```python
import torch, impls

router = impls.build_router("dynamic_top_p", d_model=32, num_experts=8)
plan = router(torch.randn(10, 32))
print((plan.expert_ids_TK >= 0).sum(-1))        # experts per token varies
print(plan.experts_per_token, plan.losses["entropy"])
```
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from impls.functional import entropy, load_balance_loss, z_loss
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig

__all__ = ["TopPConfig", "TopPRouter"]


@dataclass(frozen=True, kw_only=True)
class TopPConfig(RouterConfig):
    """Options of ``TopPRouter``.

    Attributes:
        top_p: cumulative-probability threshold ``p`` (0 < p <= 1).
        max_k: slots per token (``None`` = all experts).
        k: unused by the selection; sets the capacity formula ``ceil(cf * k * T / E)`` only.
    """

    top_p: float = 0.4
    max_k: int | None = None

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_k is not None and not 1 <= self.max_k <= num_experts:
            raise ValueError(f"max_k must be in [1, num_experts={num_experts}] or None, got {self.max_k}")


@register_router
class TopPRouter(Router):
    """Dynamic top-p routing: variable experts per token, entropy ("dynamic") loss.

    Huang et al., "Harder Tasks Need More Experts: Dynamic Routing in MoE Models", 2024,
    arXiv 2403.07652 (Sec. 3: top-p routing and the dynamic loss; equation numbers not checked).
    """

    name = "top_p"
    papers = ("dynamic-top-p-routing",)
    causal = True
    Config = TopPConfig

    @property
    def max_experts_per_token(self) -> int:
        return self.config.max_k or self.num_experts

    @property
    def combine_normalization(self) -> str:
        return "at_most_one"

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        cfg = self.config
        K = cfg.max_k or self.num_experts
        probs_TE = torch.softmax(logits_TE, dim=-1)
        sorted_p, sorted_i = torch.sort(probs_TE, dim=-1, descending=True)
        sorted_p, sorted_i = sorted_p[:, :K], sorted_i[:, :K]
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the better experts
        use_TK = before <= cfg.top_p
        use_TK[:, 0] = True
        if token_mask_T is not None:
            use_TK = use_TK & token_mask_T[:, None]
        ids_TK = torch.where(use_TK, sorted_i, -1)
        w_TK = torch.where(use_TK, sorted_p, torch.zeros_like(sorted_p))
        losses = {
            "load_balance": load_balance_loss(probs_TE, ids_TK, token_mask_T),
            "entropy": entropy(probs_TE, token_mask_T),
            "z_loss": z_loss(logits_TE, token_mask_T),
        }
        return RoutingPlan(ids_TK, w_TK, use_TK, probs_TE, logits_TE, losses, token_mask_T)


DYNAMIC_TOP_P = register_preset(
    Preset(
        name="dynamic_top_p",
        router="top_p",
        options={"top_p": 0.4},
        loss_coefficients={"load_balance": 0.01, "entropy": 1e-4},
        papers=("dynamic-top-p-routing",),
        description="Dynamic top-p routing (Huang et al. 2024, arXiv 2403.07652): threshold p = 0.4.",
        deviations="Loss weights are assumptions; the released code's values are not confirmed here.",
    )
)
