r"""Random routing: THOR's stochastic experts and PanGu-Σ's Random Routed Experts.

**THOR** (Zuo, Liu, Jiao, Kim, Hassan, Zhang, Zhao & Gao, "Taming Sparsely Activated Transformer
with Stochastic Experts", ICLR 2022, arXiv 2110.04260; official code
`microsoft/Stochastic-Mixture-of-Experts`, `thor/`). No gate: in training each MoE layer draws
**one expert uniformly at random for the whole mini-batch**, and the model runs the batch twice,
with independent draws (so the two passes generally use different experts, and may use the
same). The two passes' output distributions $p_1, p_2$ are pulled together by a consistency
regularizer, the symmetric KL divergence:

$$
\mathcal L = \mathrm{CE}(p_1) + \mathrm{CE}(p_2)
  + \alpha \cdot \tfrac12\big(\mathrm{KL}(p_1 \,\|\, p_2) + \mathrm{KL}(p_2 \,\|\, p_1)\big),
$$

(`thor_consistency_loss`; summed over non-padding target tokens as in the official code, with
$\alpha = 1$ by default there and 5 in its IWSLT De-En script). At inference the expert is again
drawn at random, per token (the official code's `inference-level 0`) or per sequence
(`eval_routing`). So that evaluation is **deterministic**, the evaluation draws come from a
generator re-seeded with `eval_seed` on every call: the same batch always meets the same experts.

**PanGu-Σ** (Ren et al., "PanGu-Σ: Towards Trillion Parameter Language Model with Sparse
Heterogeneous Computing", 2023, arXiv 2303.10845) Random Routed Experts (RRE): the experts of a
layer are split into one group per data **domain**; a token of domain $d$ goes to group $d$, and
inside the group to the expert a fixed, randomly initialized map of its **token id** names:

$$
\text{expert}(v, d) = d \cdot \tfrac{E}{N_\text{dom}} + \pi_d(v), \qquad
\pi_d : \{0..V-1\} \to \{0..E/N_\text{dom} - 1\}\ \text{drawn once, never trained}.
$$

No gate, no balancing loss; a domain's sub-model (shared layers plus its expert group) can be
served alone. Needs `token_ids` and `domain_ids`. Deviation: how the random map is drawn is not
stated in the parts of the paper that could be read; here each $(d, v)$ draws uniformly from a
seeded generator, per router (so per layer).

## Usage

```python
import torch, impls
from impls.routers.non_trainable.random_routing import thor_consistency_loss

thor = impls.build_router("thor", d_model=16, num_experts=4)
x = torch.randn(6, 16)
a, b = thor(x), thor(x)                                      # two passes, two random experts
print(a.expert_ids_TK[0].item(), b.expert_ids_TK[0].item())  # each pass: one expert for all tokens
logits_1, logits_2 = torch.randn(6, 10), torch.randn(6, 10)  # the two passes' output logits
reg = thor_consistency_loss(logits_1, logits_2)              # symmetric KL, summed over tokens

rre = impls.build_router("random_routed_experts", d_model=16, num_experts=8, vocab_size=50, num_domains=2)
plan = rre(x, token_ids=torch.arange(6), domain_ids=torch.tensor([0, 0, 0, 1, 1, 1]))
print(plan.expert_ids_TK[:, 0])                              # domain 0 -> experts 0-3, domain 1 -> 4-7
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import RouterConfig
from impls.routers.non_trainable._gateless import GatelessRouter

__all__ = [
    "PANGU_SIGMA",
    "THOR_IWSLT",
    "RandomRoutedExpertsConfig",
    "RandomRoutedExpertsRouter",
    "ThorConfig",
    "ThorRouter",
    "thor_consistency_loss",
]


def thor_consistency_loss(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    reduction: Literal["sum", "mean"] = "sum",
) -> torch.Tensor:
    """THOR's regularizer ``0.5 * (KL(p_a || p_b) + KL(p_b || p_a))`` over the last axis, in float32.

    ``logits_*``: the two passes' output logits ``[..., V]``; ``token_mask`` (``bool``, shaped like
    the leading axes) leaves padding out. ``reduction="sum"`` (the official code) or ``"mean"`` over
    valid tokens.
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits shapes differ: {list(logits_a.shape)} vs {list(logits_b.shape)}")
    la = F.log_softmax(logits_a.float(), -1)
    lb = F.log_softmax(logits_b.float(), -1)
    skl = 0.5 * ((la.exp() - lb.exp()) * (la - lb)).sum(-1)  # = (KL(a||b) + KL(b||a)) / 2
    if token_mask is not None:
        if token_mask.shape != skl.shape or token_mask.dtype != torch.bool:
            raise ValueError(
                f"token_mask must be bool {list(skl.shape)}, got {token_mask.dtype} {list(token_mask.shape)}"
            )
        skl = torch.where(token_mask, skl, skl.new_zeros(()))
        n = token_mask.sum()
    else:
        n = skl.new_tensor(skl.numel())
    if reduction == "sum":
        return skl.sum()
    if reduction == "mean":
        return skl.sum() / n.clamp_min(1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


@dataclass(frozen=True, kw_only=True)
class ThorConfig(RouterConfig):
    """Options of ``ThorRouter``.

    Attributes:
        eval_routing: evaluation draws one expert per ``"token"`` or per ``"sequence"``.
        eval_seed: seed of the evaluation draws (re-seeded every call: deterministic evaluation).
    """

    eval_routing: Literal["token", "sequence"] = "token"
    eval_seed: int = 0

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.k != 1:
            raise ValueError("THOR activates one expert per layer (k=1)")
        if self.eval_routing not in ("token", "sequence"):
            raise ValueError(f"eval_routing must be 'token' or 'sequence', got {self.eval_routing!r}")
        if self.has_capacity:
            raise ValueError("THOR routes a whole batch to one expert; capacity_factor is not supported")


@register_router
class ThorRouter(GatelessRouter):
    """THOR (Zuo et al., ICLR 2022): one uniformly random expert per batch in training, no gate."""

    name = "thor"
    papers = ("thor",)
    causal = True
    Config = ThorConfig
    config: ThorConfig

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)

    @property
    def compile_break(self) -> str | None:
        if self.training:
            return None
        return "the evaluation draw uses a seeded CPU torch.Generator, which the compiler does not trace"

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        T, E, dev = logits_TE.shape[0], self.num_experts, logits_TE.device
        if self.training:  # the global generator: a fresh draw every pass (no host sync)
            ids_T = torch.randint(0, E, (1,), device=dev).expand(T)
        else:
            # drawn on the CPU so that every device sees the same experts, then copied over
            g = torch.Generator().manual_seed(self.config.eval_seed)
            seq = self.sequence_length if self.config.eval_routing == "sequence" else None
            n = T // seq if seq else T
            ids_T = torch.randint(0, E, (n,), generator=g).to(dev, non_blocking=True)
            if seq:
                ids_T = ids_T.repeat_interleave(seq)
        # the scores are the draw's distribution: uniform over the experts
        return self.one_expert_plan(ids_T, logits_TE, token_mask_T, torch.full_like(logits_TE, 1.0 / E))


@dataclass(frozen=True, kw_only=True)
class RandomRoutedExpertsConfig(RouterConfig):
    """Options of ``RandomRoutedExpertsRouter``.

    Attributes:
        vocab_size: token ids the random maps cover.
        num_domains: domains; ``num_experts`` must be a multiple of it (one equal group each).
        seed: seed of the random maps.
    """

    vocab_size: int = 0
    num_domains: int = 1
    seed: int = 0

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.k != 1:
            raise ValueError("Random Routed Experts send each token to one expert (k=1)")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1, got {self.vocab_size!r}")
        if not isinstance(self.num_domains, int) or self.num_domains < 1 or num_experts % self.num_domains:
            raise ValueError(
                f"num_domains must divide num_experts={num_experts} (one equal expert group per domain), "
                f"got num_domains={self.num_domains!r}"
            )


@register_router
class RandomRoutedExpertsRouter(GatelessRouter):
    """PanGu-Σ Random Routed Experts (Ren et al. 2023): domain -> group, token id -> fixed random expert."""

    name = "random_routed_experts"
    papers = ("pangu-sigma",)
    causal = True
    Config = RandomRoutedExpertsConfig
    config: RandomRoutedExpertsConfig
    routing_inputs = ("token_ids", "domain_ids")

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        cfg = self.config
        per = num_experts // cfg.num_domains
        g = torch.Generator().manual_seed(cfg.seed)
        offsets = torch.arange(cfg.num_domains)[:, None] * per
        self.register_buffer(
            "table_NV", offsets + torch.randint(0, per, (cfg.num_domains, cfg.vocab_size), generator=g)
        )

    @property
    def experts_per_domain(self) -> int:
        return self.num_experts // self.config.num_domains

    def input_ranges(self) -> dict[str, int]:
        return {"token_ids": self.config.vocab_size, "domain_ids": self.config.num_domains}

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        ids_T = self.table_NV[self.inputs["domain_ids"], self.inputs["token_ids"]]
        return self.one_expert_plan(ids_T, logits_TE, token_mask_T)


THOR_IWSLT = register_preset(
    Preset(
        name="thor_iwslt",
        router="thor",
        num_experts=2,
        papers=("thor",),
        description=(
            "THOR on IWSLT'14 De-En (Zuo et al., ICLR 2022; official `run.sh`): 2 experts in every other "
            "layer, consistency weight alpha = 5 (pass it to `thor_consistency_loss`)."
        ),
        deviations="evaluation draws are seeded (deterministic) rather than fresh.",
    )
)

PANGU_SIGMA = register_preset(
    Preset(
        name="pangu_sigma",
        router="random_routed_experts",
        options={"num_domains": 40},
        num_experts=640,
        papers=("pangu-sigma",),
        description=(
            "PanGu-Σ Random Routed Experts (Ren et al. 2023): 40 domain groups of 16 experts in each sparse "
            "layer. Pass vocab_size."
        ),
        deviations=(
            "The 40 x 16 layout is from secondary accounts of the paper (unverified); the random map is "
            "drawn uniformly per (domain, token id)."
        ),
    )
)
