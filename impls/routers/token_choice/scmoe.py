r"""SCMoE: self-contrast between a strong and a weak activation of the same MoE model (Shi et al. 2024).

A top-$k$ model leaves most experts unused for every token. SCMoE (training-free, inference only)
runs the model twice per decoding step with the *same* weights: once with its usual **strong**
activation (top-2 for Mixtral) and once with a **weak** activation, *rank-$k'$ routing*, in
which every MoE layer sends each token only to the expert ranked $k'$-th by the router
(rank 2 in the paper), with weight 1. The next token is chosen by contrasting the two:

$$
s(v) = (1 + \beta)\, z_s(v) - \beta\, z_w(v) \quad \text{for } v \in \mathcal{V}_\text{head}, \qquad
\mathcal{V}_\text{head} = \{v : z_s(v) \ge \log\alpha + \max_u z_s(u)\},
$$

$z_s, z_w$ the strong and weak logits, $s(v) = -\infty$ outside the *adaptive plausibility
constraint* $\mathcal{V}_\text{head}$ (tokens the strong model itself finds at least $\alpha$
times as likely as its best one). Since $\log p = z - \operatorname{logsumexp}(z)$ per position,
contrasting logits or log-probabilities gives the same ranking.

Here the router is **`scmoe`**, a softmax top-$k$ router with a mode: `router.activation` is
`"strong"` (top-$k$, weights renormalized, as Mixtral) or `"weak"` (only the expert at rank
`weak_rank`, 1-based, weight 1). `weak_activation(model)` switches every SCMoE router of a model
to the weak mode inside a `with` block; `self_contrast(strong_logits, weak_logits, beta, alpha)`
is the decoding rule above. With $\beta = 0$ the rule returns the strong logits on
$\mathcal{V}_\text{head}$ (so greedy decoding is unchanged), and with $\alpha = 0$ as well it
returns them everywhere. The gate weights are the same in both modes, so a Mixtral checkpoint's
router loads into it as into `topk`.

## Defaults and what is confirmed

From the official code and the paper's hyperparameter sentences (quoted by a reproducibility
page; the paper's text was not read here): strong = Mixtral's top-2, weak = rank-2 routing,
$\alpha = 0.1$, $\beta$ searched over $\{0.1, 0.3, 0.5, 0.7, 0.9\}$ with 0.5 the released code's
default; temperature 1 for both passes.

**Deviations.** The official code also offers a random weak expert and DeepSeekMoE's weak mode
without renormalization (raw probability, shared experts added); only Mixtral's rank-$k'$ mode
is provided. Each pass needs its own KV cache, which is the caller's model's business.

## Usage

```python
import torch, impls
from impls.routers.token_choice.scmoe import self_contrast, weak_activation

layer = impls.MoELayer(32, 64, router="scmoe_mixtral")        # 8 experts, top-2 / rank-2
x = torch.randn(1, 5, 32)
strong, _ = layer(x)
with weak_activation(layer):
    weak, _ = layer(x)                                          # every token: its 2nd expert only
vocab = torch.nn.Linear(32, 100)
scores = self_contrast(vocab(strong[:, -1]), vocab(weak[:, -1]), beta=0.5, alpha=0.1)
next_token = scores.argmax(-1)
```
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from impls.functional import load_balance_loss, topk, z_loss
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig
from impls.routers.token_choice.topk import topk_softmax

__all__ = ["SelfContrastConfig", "SelfContrastRouter", "self_contrast", "weak_activation"]


def self_contrast(
    strong_logits: torch.Tensor, weak_logits: torch.Tensor, beta: float = 0.5, alpha: float = 0.1
) -> torch.Tensor:
    """SCMoE's next-token scores ``(1 + beta) z_s - beta z_w`` on the plausible tokens, ``-inf`` elsewhere."""
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if strong_logits.shape != weak_logits.shape:
        raise ValueError(
            f"strong and weak logits must have the same shape, got {tuple(strong_logits.shape)} "
            f"and {tuple(weak_logits.shape)}"
        )
    zs, zw = strong_logits.float(), weak_logits.float()
    scores = (1.0 + beta) * zs - beta * zw if beta else zs.clone()
    if alpha > 0:
        cutoff = math.log(alpha) + zs.max(-1, keepdim=True).values
        scores = scores.masked_fill(zs < cutoff, float("-inf"))
    return scores


@dataclass(frozen=True, kw_only=True)
class SelfContrastConfig(RouterConfig):
    """Options of ``SelfContrastRouter``.

    Attributes:
        k: experts of the strong activation (top-k, renormalized).
        weak_rank: the 1-based rank of the single expert of the weak activation.
    """

    k: int = 2
    weak_rank: int = 2

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.k == 1:
            raise ValueError(
                "k=1 renormalized makes the only weight the constant 1; SCMoE's strong mode uses k >= 2"
            )
        if not isinstance(self.weak_rank, int) or not 1 <= self.weak_rank <= num_experts:
            raise ValueError(
                f"weak_rank must be an int in [1, num_experts={num_experts}], got {self.weak_rank!r}"
            )


@register_router
class SelfContrastRouter(Router):
    """Softmax top-k router with SCMoE's weak (rank-k') activation as a second mode.

    Shi et al., "Unchosen Experts Can Contribute Too: Unleashing MoE Models' Power by
    Self-Contrast", NeurIPS 2024, arXiv 2405.14507 (strong and weak activation, the contrast and
    the adaptive plausibility constraint; equation numbers not checked).
    """

    name = "scmoe"
    papers = ("scmoe",)
    causal = True
    Config = SelfContrastConfig
    config: SelfContrastConfig

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        self.activation = "strong"

    @property
    def max_experts_per_token(self) -> int:
        return self.config.k if self.activation == "strong" else 1

    @property
    def combine_normalization(self) -> float:
        return 1.0

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        if self.activation == "weak":
            probs_TE = torch.softmax(logits_TE, dim=-1)
            r = self.config.weak_rank
            ids_TK = topk(probs_TE, r)[1][:, r - 1 :]
            w_TK = torch.ones_like(ids_TK, dtype=torch.float32)  # renormalized over one expert
        else:  # Mixtral's top-k, renormalized
            probs_TE, ids_TK, w_TK = topk_softmax(logits_TE, self.config.k)
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        losses = {
            "load_balance": load_balance_loss(probs_TE, ids_TK, token_mask_T),
            "z_loss": z_loss(logits_TE, token_mask_T),
        }
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        return RoutingPlan(ids_TK, w_TK, keep_TK, probs_TE, logits_TE, losses, token_mask_T)


@contextlib.contextmanager
def weak_activation(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every ``SelfContrastRouter`` of ``model`` routes with the weak activation."""
    routers = [m for m in model.modules() if isinstance(m, SelfContrastRouter)]
    if not routers:
        raise ValueError(
            "weak_activation: the model holds no SelfContrastRouter (build its layers with 'scmoe')"
        )
    saved = [r.activation for r in routers]
    for r in routers:
        r.activation = "weak"
    try:
        yield model
    finally:
        for r, a in zip(routers, saved, strict=True):
            r.activation = a


SCMOE_MIXTRAL = register_preset(
    Preset(
        name="scmoe_mixtral",
        router="scmoe",
        options={"k": 2, "weak_rank": 2},
        num_experts=8,
        layer={"activation": "swiglu"},
        loss_coefficients={"load_balance": 0.02},
        papers=("scmoe",),
        description=(
            "SCMoE on Mixtral 8x7B (Shi et al. 2024, arXiv 2405.14507): strong = top-2, weak = rank-2 "
            "routing; decode with self_contrast(beta=0.5, alpha=0.1)."
        ),
        deviations=(
            "beta 0.5 is the released code's default (the paper tunes it per task over 0.1-0.9). The "
            "balance weight is Mixtral's, for training the same router; SCMoE itself trains nothing."
        ),
    )
)
