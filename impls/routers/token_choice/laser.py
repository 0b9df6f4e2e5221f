r"""LASER (Shahout et al. 2025): load-aware top-k at inference, from the shape of each token's gate scores.

A trained top-$k$ gate is often *flat* for many tokens: several experts score almost alike, and
which $k$ of them the token uses matters little for accuracy but a lot for load balance. LASER is
a plug-and-play, inference-time rule on the gate's scores only (no retraining): when a token's
scores show a clear preference it takes its top-$k$; when they are flat it widens its candidate
set and takes the **least-loaded** candidates. Per batch, with $p_t = \operatorname{softmax}(h_t)$
and $\ell_e$ the load expert $e$ would get under plain top-$k$:

$$
\text{flat}_t = \Big(\sum_{e \in \operatorname{TopK}(p_t)} p_{t,e} < \epsilon\Big), \qquad
\mathcal{C}_t = \operatorname{TopC}(p_t), \qquad
\mathcal{T}_t = \begin{cases}
\operatorname{TopK}(p_t) & \text{not flat} \\
\text{the } k \text{ experts of } \mathcal{C}_t \text{ with the smallest } \ell_e
\text{ (ties: higher } p_{t,e}) & \text{flat,}
\end{cases}
$$

with the combine weights the chosen probabilities, renormalized as the base router does. Only
flat tokens move, and each only among experts it already rates highly.

## What is confirmed, and what is reconstructed

The paper's body and code could not be read for this implementation. **Confirmed** (abstract):
inference-time, plug-and-play, from the gate's score distribution; strongest experts when the
scores show a clear preference, the least-loaded among a broadened set of viable experts when
they are uniform; evaluated on Mixtral-8x7B and DeepSeek-MoE-16B. **Reconstructed** (from a
third-party reproduction, unverified): flatness as top-$k$ mass below $\epsilon$, candidates the
top-$c$ experts, load counted on the batch's plain top-$k$ choices, ties broken by score; the
defaults $\epsilon = 0.4$ and $c = 2k$ are that reproduction's example values (it used
$c = 10$), not the paper's.

**Deviations.** Applied in `eval()` only by default (`in_training=True` also applies it in
training); the loads are those of the current batch, not a running estimate across batches.

## Usage

```python
import torch, impls

router = impls.build_router("laser", d_model=32, num_experts=8, k=2).eval()
plan = router(torch.randn(64, 32))
print(plan.info["flat_fraction"], plan.expert_load)
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from impls.functional import expert_counts, masked_mean, topk
from impls.plan import RoutingPlan
from impls.registry import register_router
from impls.routers.token_choice.topk import TopKConfig, TopKRouter

__all__ = ["LASERConfig", "LASERRouter", "laser_select"]


def laser_select(
    probs_TE: torch.Tensor,
    k: int,
    candidates: int,
    flat_threshold: float,
    token_mask_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(expert_ids_TK, flat_T)``: plain top-k for peaked tokens, least-loaded candidates for flat ones."""
    E = probs_TE.shape[-1]
    top_p_TK, top_ids_TK = topk(probs_TE, k)
    load_E = expert_counts(top_ids_TK, E, token_mask_T)
    flat_T = top_p_TK.sum(-1) < flat_threshold
    c = min(max(candidates, k), E)
    cand_p_TC, cand_ids_TC = topk(probs_TE, c)
    # lowest load first; among equal loads the higher probability (probabilities lie in [0, 1])
    key_TC = load_E[cand_ids_TC] * 2.0 - cand_p_TC
    order_TK = torch.sort(key_TC, dim=-1, stable=True).indices[:, :k]
    chosen_TK = cand_ids_TC.gather(1, order_TK)
    return torch.where(flat_T[:, None], chosen_TK, top_ids_TK), flat_T


@dataclass(frozen=True, kw_only=True)
class LASERConfig(TopKConfig):
    """Options of ``LASERRouter``: the top-k router's, plus LASER's rule.

    Attributes:
        flat_threshold: ``epsilon``; a token whose top-k probability mass is below it is flat.
        candidates: ``c``, how many top experts a flat token may choose from (``None`` = ``2k``).
        in_training: also apply the rule in training (by default it is inference-only).
    """

    flat_threshold: float = 0.4
    candidates: int | None = None
    in_training: bool = False

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if not 0 <= self.flat_threshold <= 1:
            raise ValueError(f"flat_threshold must be in [0, 1], got {self.flat_threshold}")
        if self.candidates is not None and not self.k <= self.candidates <= num_experts:
            raise ValueError(
                f"candidates must be in [k={self.k}, num_experts={num_experts}], got {self.candidates}"
            )
        if self.softmax_order != "before" or self.estimator != "topk":
            raise ValueError(
                "LASER re-selects from the softmax over all experts: softmax_order='before', estimator='topk'"
            )


@register_router
class LASERRouter(TopKRouter):
    """Softmax top-k whose flat tokens take the least-loaded of their top-c experts (inference-time).

    Shahout, Cai, Du, Yu, Mitzenmacher, "From Score Distributions to Balance: Plug-and-Play
    Mixture-of-Experts Routing", arXiv 2510.03293 (2025). The rule's details are a reconstruction
    (see the module docstring).
    """

    name = "laser"
    papers = ("laser",)
    Config = LASERConfig
    config: LASERConfig
    causal = False  # a flat token's choice depends on the loads of the whole batch

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        plan = super().route(logits_TE, x_TD, token_mask_T)
        cfg = self.config
        if self.training and not cfg.in_training:
            return plan
        probs_TE = plan.scores_TE
        c = cfg.candidates if cfg.candidates is not None else 2 * cfg.k
        ids_TK, flat_T = laser_select(probs_TE, cfg.k, c, cfg.flat_threshold, token_mask_T)
        w_TK = probs_TE.gather(1, ids_TK)
        if cfg.normalize:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        info = {**plan.info, "flat_fraction": masked_mean(flat_T.float(), token_mask_T)}
        return dataclasses.replace(plan, expert_ids_TK=ids_TK, weights_TK=w_TK, info=info)
