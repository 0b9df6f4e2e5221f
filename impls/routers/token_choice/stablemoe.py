r"""StableMoE: learn a routing, distill it into a word-embedding router, freeze it (Dai et al., ACL 2022).

A learned router keeps changing its mind during training: the same token goes to one expert
early on and to another later, although only one of them will be used at inference. StableMoE
trains in two stages (Sec. 3).

**Stage 1** (Sec. 3.1) routes greedily on the dot product with *expert centroids*
$E \in \mathbb{R}^{N \times d}$ (Eq. 5-6) and gates the chosen expert with a sigmoid (Eq. 7):

$$
s_{t,i} = E_i^\top h_t, \qquad a_t = \arg\max_i s_{t,i}, \qquad
h_t' = h_t + \sigma(s_{t,a_t}) \, \mathrm{FFN}_{a_t}(h_t).
$$

The balance loss (Eq. 8) pushes the scores of overloaded experts down and of underloaded ones up,
each expert's $(|A_i| - \bar n)/\bar n$ acting as a constant weight ($A_i$ the tokens assigned to
expert $i$, $\bar n$ the mean number per expert):

$$
\mathcal{L}_\text{bal} = \alpha \sum_{i=1}^{N} \frac{|A_i| - \bar n}{\bar n} \sum_{t \in A_i} \sigma(s_{t,i}).
$$

Alongside, a *lightweight distilled router* — a word embedding $\hat h_t = D(X_t)$ of the input
token (dimension 50) scored against its own centroids $\hat E$ (Eq. 9) — learns the stage-1
assignment by cross-entropy (Eq. 10):

$$
\hat s_{t,i} = \hat E_i^\top \hat h_t, \qquad
\mathcal{L}_\text{dis} = -\sum_t \log \operatorname{softmax}(\hat s_t)_{a_t}.
$$

**Stage 2** (Sec. 3.2) freezes $D$ and $\hat E$ and routes by them alone,
$\hat a_t = \arg\max_i \hat s_{t,i}$ (Eq. 12-13): the expert of a token is then a fixed function
of its token id. The gate keeps the original centroids, $h_t' = h_t + \sigma(s_{t,\hat a_t})\,
\mathrm{FFN}_{\hat a_t}(h_t)$ (Eq. 14), which keep training; the only loss is the task loss
(Eq. 15). Inference routes like stage 2 (Sec. 3.3).

The stage switch is an explicit call: **`router.freeze_routing()`** ends stage 1 (the paper does
it after 10% of the steps, Table 6); `router.stage` tells which stage the router is in, and is
saved in its state dict. Outside training the router routes by the distilled router in either
stage, as the official code does (a stage-1 evaluation uses the router inference will use).

The router needs the token ids: `router(x, token_ids=ids)` (or `MoELayer(..., token_ids=ids)`).

Losses (unweighted, as `balance` and `distill`) are the paper's sums divided by the number of
valid tokens: the official criterion sums them over tokens and fairseq then divides the whole
loss by the token count, so per-token means with the paper's coefficients are the same objective.
Both are zero (with a gradient path) in stage 2 and outside training.

## Defaults and what is confirmed

Confirmed in the paper (Sec. 4.2, Appendix A): distilled-router dimension 50, balance factor
$\alpha = 0.3$, stage 1 = 6K of 60K steps (10%), greedy top-1 assignment with sigmoid gating.
The distillation weight 0.3 is the official code's (`--distill-factor`); the paper gives none.
The centroids are initialized orthogonally with gain 0.1 and the word embedding by a standard
normal, as in the official code.

**Deviations.** The official code can also assign by BASE's balanced assignment in stage 1
(`--assignment-algorithm BA`, its default; the README and the paper use greedy) and applies a
capacity factor of 2; this router is greedy and dropless by default (`capacity_factor=2.0`
restores the cap). The paper's expert is three stacked FFN sublayers; here an expert is whatever
the layer holds.

## Usage

```python
import torch, impls

router = impls.build_router("stable_moe", d_model=64, num_experts=8, vocab_size=1000)
ids = torch.randint(0, 1000, (4, 16))
plan = router(torch.randn(4, 16, 64), token_ids=ids)       # stage 1: greedy + balance + distill
loss = plan.aux_loss({"balance": 0.3, "distill": 0.3})
router.freeze_routing()                                     # stage 2: expert = f(token id)
plan = router(torch.randn(4, 16, 64), token_ids=ids)
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from impls.functional import expert_counts, topk
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig

__all__ = ["StableMoEConfig", "StableMoERouter"]


@dataclass(frozen=True, kw_only=True)
class StableMoEConfig(RouterConfig):
    """Options of ``StableMoERouter``.

    Attributes:
        vocab_size: token ids the distilled router's word embedding covers.
        distill_dim: dimension of the distilled routing feature (50 in the paper).
        centroid_gain: gain of the orthogonal initialization of both sets of centroids.
    """

    vocab_size: int = 0
    distill_dim: int = 50
    centroid_gain: float = 0.1

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.k != 1:
            raise ValueError(f"StableMoE routes every token to one expert (k=1), got k={self.k}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(
                f"vocab_size must be an int >= 1 (the token ids the distilled router covers), "
                f"got {self.vocab_size!r}"
            )
        if not isinstance(self.distill_dim, int) or self.distill_dim < 1:
            raise ValueError(f"distill_dim must be an int >= 1, got {self.distill_dim!r}")
        if not self.centroid_gain > 0:
            raise ValueError(f"centroid_gain must be > 0, got {self.centroid_gain}")


@register_router
class StableMoERouter(Router):
    """StableMoE's two-stage router: greedy centroid routing distilled into a frozen word-embedding router.

    Dai et al., "StableMoE: Stable Routing Strategy for Mixture of Experts", ACL 2022,
    arXiv 2204.08396: Sec. 3.1 (stage 1, Eq. 5-11), Sec. 3.2 (stage 2, Eq. 12-15), Sec. 3.3
    (inference).
    """

    name = "stablemoe"
    papers = ("stablemoe",)
    causal = True
    Config = StableMoEConfig
    config: StableMoEConfig
    routing_inputs = ("token_ids",)

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        cfg = self.config
        nn.init.orthogonal_(self.gate.weight, gain=cfg.centroid_gain)  # the expert centroids E
        self.routing_embedding = nn.Embedding(cfg.vocab_size, cfg.distill_dim, dtype=torch.float32)
        self.distill_centroids = nn.Parameter(torch.empty(num_experts, cfg.distill_dim, dtype=torch.float32))
        nn.init.orthogonal_(self.distill_centroids, gain=cfg.centroid_gain)
        self.register_buffer("stage_flag", torch.ones((), dtype=torch.long))

    def input_ranges(self) -> dict[str, int]:
        return {"token_ids": self.config.vocab_size}

    @property
    def stage(self) -> int:
        """1 (learn and distill the routing) or 2 (routing frozen); one host read."""
        return int(self.stage_flag)

    @torch.no_grad()
    def freeze_routing(self) -> None:
        """End stage 1: freeze the distilled router; from now on it alone picks the experts."""
        self.stage_flag.fill_(2)
        self.routing_embedding.weight.requires_grad_(False)
        self.distill_centroids.requires_grad_(False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        frozen = int(self.stage_flag) == 2
        self.routing_embedding.weight.requires_grad_(not frozen)
        self.distill_centroids.requires_grad_(not frozen)

    @property
    def combine_normalization(self) -> None:
        return None  # a sigmoid gate on one expert

    def distilled_logits(self, token_ids_T: torch.Tensor) -> torch.Tensor:
        """``float32 [T, E]``: the distilled router's scores ``s_hat`` (Eq. 9)."""
        h_TR = self.routing_embedding(token_ids_T).float()
        return h_TR @ self.distill_centroids.float().T

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        E = self.num_experts
        s_hat_TE = self.distilled_logits(self.inputs["token_ids"])
        # a 0-d bool tensor (no host sync): stage-1 training routes greedily and trains the distillation
        learning = (self.stage_flag == 1) & self.training
        greedy_TK = topk(logits_TE.detach(), 1)[1]
        distilled_TK = topk(s_hat_TE.detach(), 1)[1]
        ids_TK = torch.where(learning, greedy_TK, distilled_TK)
        gate_TE = torch.sigmoid(logits_TE)
        w_TK = gate_TE.gather(1, ids_TK)
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        valid_T = (
            torch.ones_like(logits_TE[:, 0]) if token_mask_T is None else token_mask_T.to(logits_TE.dtype)
        )
        n_valid = valid_T.sum().clamp_min(1)
        # Eq. 8: ((|A_i| - n_bar) / n_bar) * sum_{t in A_i} sigmoid(s_ti), over the greedy assignment
        counts_E = expert_counts(greedy_TK, E, token_mask_T)
        n_bar = n_valid / E
        excess_E = (counts_E - n_bar) / n_bar
        own_T = gate_TE.gather(1, greedy_TK)[:, 0] * valid_T
        balance = (excess_E.gather(0, greedy_TK[:, 0]) * own_T).sum() / n_valid
        # Eq. 10: cross-entropy of the distilled router against the stage-1 assignment
        ce_T = nn.functional.cross_entropy(s_hat_TE, greedy_TK[:, 0], reduction="none")
        distill = (ce_T * valid_T).sum() / n_valid
        on = learning.to(logits_TE.dtype)
        losses = {"balance": balance * on, "distill": distill * on}
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        scores_TE = torch.where(learning, gate_TE, torch.softmax(s_hat_TE, dim=-1))
        return RoutingPlan(
            ids_TK, w_TK, keep_TK, scores_TE, logits_TE, losses, token_mask_T, info={"stage": self.stage_flag}
        )


STABLE_MOE = register_preset(
    Preset(
        name="stable_moe",
        router="stablemoe",
        options={"distill_dim": 50},
        num_experts=32,
        loss_coefficients={"balance": 0.3, "distill": 0.3},
        papers=("stablemoe",),
        description=(
            "StableMoE (Dai et al., ACL 2022, arXiv 2204.08396): 32 experts (base LM), greedy top-1 with a "
            "sigmoid gate, balance factor 0.3, 50-d distilled word-embedding router frozen after stage 1."
        ),
        deviations=(
            "The distillation weight 0.3 is the official code's (the paper states none). The paper's MoE "
            "layer is 3 stacked FFN sublayers after the middle block; the preset configures the router "
            "only. Stage 2 starts with freeze_routing(), called by the training loop (10% of the steps)."
        ),
    )
)
