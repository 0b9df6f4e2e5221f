r"""Expert choice routing: each expert takes its top-C tokens, so every expert is equally loaded.

Zhou, Lei, Liu, Du, Huang, Zhao, Dai, Chen, Le & Laudon, "Mixture-of-Experts with Expert Choice
Routing", NeurIPS 2022 (arXiv:2202.09368). Instead of each token picking its top-$k$ experts,
**each expert picks its top-$C$ tokens**. With $X \in \mathbb{R}^{T \times D}$ and gate
$W_g \in \mathbb{R}^{D \times E}$ (paper §3.2, eq. 1):

$$
S = \mathrm{softmax}(X W_g) \in \mathbb{R}^{T \times E}, \qquad
G, I = \mathrm{TopK}(S^\top, C), \qquad C = \Bigl\lceil \frac{T \cdot c}{E} \Bigr\rceil ,
$$

and token $t$'s output is $\sum_{e:\, t \in I_e} S_{te}\, f_e(x_t)$: the **combine weight is the
affinity** $S_{te}$ itself. $c$ is the capacity factor, the average number of experts per token;
$c = 2$ ("EC-CF2") in most of the paper's experiments. Every expert processes exactly $C$ tokens,
so the load is perfectly balanced with no auxiliary loss; a token may get **zero, one or several**
experts.

In the routing plan this is expressed with $K = E$ slots per token: slot $e$ is expert $e$ and
`keep_TK[t, e]` says whether expert $e$ picked token $t$ (`expert_ids_TK[t, e] = -1` otherwise).
`plan.capacity` is $C$.

!!! warning "Not causal"
    An expert ranks tokens against the **whole batch**, so a later token can displace an earlier
    one from an expert (and change its output). Expert choice must not be used in autoregressive
    decoders (flaxformer's ``ExpertsChooseMaskedRouter`` carries the same warning); the class has
    ``causal = False`` and warns when constructed.

**Padding.** $C$ counts valid tokens only ($T$ = non-padding tokens; reading that count from a
mask is one host sync). Padding tokens are never picked before a valid token, and picks of padding
are empty (not kept).

**Not implemented.** The paper's variant that caps the number of experts per token by solving an
entropy-regularized linear program is not included.

## Brainformers

Zhou et al., "Brainformers: Trading Simplicity for Efficiency", ICML 2023 (arXiv:2306.00008),
searches interleavings of attention, dense and sparse layers whose sparse layers use expert choice
gating. The `brainformer` preset is expert choice with $c = 2$; the capacity factors the search
picked per layer are not reproduced (unconfirmed), so that preset is the gating only.

## Usage

```python
import torch, impls

router = impls.build_router("expert_choice_cf2", d_model=16, num_experts=4)
plan = router(torch.randn(32, 16))     # warns: expert choice is not causal
print(plan.capacity)                   # ceil(32 * 2 / 4) = 16 tokens per expert
print(plan.expert_load)                # exactly 16 each
print(plan.keep_TK.sum(-1))            # experts per token: 0, 1, 2, ... (mean 2)
```
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig


@dataclass(frozen=True, kw_only=True)
class ExpertChoiceConfig(RouterConfig):
    """Expert-choice options.

    Attributes:
        capacity_factor: ``c``, tokens per expert ``C = ceil(T * c / E)`` (the mean number of
            experts per token); required.
        eval_capacity_factor: ``c`` in ``eval()``; ``None`` = same as training.
        k: unused by expert choice and must stay 1 (the capacity factor sets experts per token).
    """

    capacity_factor: float | None = 2.0

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.capacity_factor is None:
            raise ValueError("capacity_factor must be set for expert choice (tokens per expert = T*c/E)")
        if self.k != 1:
            raise ValueError(
                f"k must be 1 for expert choice (use capacity_factor for experts per token), got {self.k}"
            )
        if self.capacity_groups != "batch" or self.expert_capacity is not None:
            raise ValueError(
                "expert choice takes C = ceil(T * c / E) tokens per expert over the whole call; "
                "capacity_groups and expert_capacity are not supported"
            )


@register_router
class ExpertChoiceRouter(Router):
    """Each expert takes its top-C tokens (Zhou et al., "Mixture-of-Experts with Expert Choice
    Routing", NeurIPS 2022, arXiv:2202.09368). Not causal."""

    nonfinite_sync = True  # syncs with the host anyway; see impls.router

    name = "expert_choice"
    papers = ("expert-choice", "brainformers")
    causal = False
    balanced_by_construction = True
    Config = ExpertChoiceConfig

    @property
    def max_experts_per_token(self) -> int:
        return self.num_experts

    @property
    def combine_normalization(self) -> str:
        return "at_most_one"  # a subset of one token's softmax probabilities

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        warnings.warn(
            "ExpertChoiceRouter is not causal: experts rank tokens over the whole batch, so later tokens "
            "change the routing of earlier ones; do not use it in autoregressive decoders",
            UserWarning,
            stacklevel=2,
        )

    def route(self, logits_TE, x_TD, token_mask_T):
        T, E = logits_TE.shape
        n_valid = T if token_mask_T is None else int(token_mask_T.sum())  # host sync with padding
        C = self.current_capacity(n_valid)
        assert C is not None  # capacity_factor is required by the config
        probs_TE = logits_TE.softmax(-1)
        rank_TE = probs_TE.detach()
        if token_mask_T is not None:
            rank_TE = rank_TE.masked_fill(~token_mask_T[:, None], -1.0)
        picked_EC = rank_TE.t().topk(C, dim=1).indices  # expert e's top-C tokens
        chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=logits_TE.device)
        chosen_TE[picked_EC, torch.arange(E, device=logits_TE.device)[:, None]] = True
        keep_TE = chosen_TE if token_mask_T is None else chosen_TE & token_mask_T[:, None]
        ids_TE = torch.where(keep_TE, torch.arange(E, device=logits_TE.device), -1)
        weights_TE = torch.where(keep_TE, probs_TE, torch.zeros_like(probs_TE))
        return RoutingPlan(
            expert_ids_TK=ids_TE,
            weights_TK=weights_TE,
            keep_TK=keep_TE,
            scores_TE=probs_TE,
            logits_TE=logits_TE,
            token_mask_T=token_mask_T,
            capacity=C,
        )

    def _apply_capacity(self, plan: RoutingPlan) -> RoutingPlan:
        # Capacity is the routing rule itself (each expert took exactly C tokens in route()).
        return plan


EXPERT_CHOICE_CF2 = register_preset(
    Preset(
        name="expert_choice_cf2",
        router="expert_choice",
        options={"capacity_factor": 2.0},
        papers=("expert-choice",),
        description="EC-CF2: each expert takes ceil(2T/E) tokens, weights = softmax affinity "
        "(Zhou et al. 2022, arXiv:2202.09368).",
        deviations="The per-token expert cap (regularized LP variant) is not implemented.",
    )
)
BRAINFORMER = register_preset(
    Preset(
        name="brainformer",
        router="expert_choice",
        options={"capacity_factor": 2.0},
        papers=("brainformers",),
        description="Expert-choice gating of Brainformer sparse layers (Zhou et al. 2023, arXiv:2306.00008).",
        deviations="Gating only; the searched per-layer capacity factors are unconfirmed, c=2 is the "
        "expert-choice paper's default.",
    )
)
