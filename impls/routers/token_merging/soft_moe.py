r"""Soft MoE: every expert slot processes a softmax-weighted mixture of all the tokens of a sequence.

Puigcerver, Riquelme, Mustafa & Houlsby, "From Sparse to Soft Mixtures of Experts", ICLR 2024,
arXiv 2308.00951 (Sec. 2.1, Algorithms 1 and 2, Sec. 2.3 "Normalization", App. E; official
code: google-research `vmoe`, `vmoe/projects/soft_moe/router.py`).

For one sequence $X \in \mathbb{R}^{m \times d}$, $n$ experts with $p$ slots each and slot
parameters $\Phi \in \mathbb{R}^{d \times np}$ (one $d$-vector per slot), both weightings come from
the same logits $XΦ$:

$$
D_{ij} = \frac{\exp((X\Phi)_{ij})}{\sum_{i'=1}^{m} \exp((X\Phi)_{i'j})}
\quad \text{(eq. 1, softmax over tokens)},
\qquad
C_{ij} = \frac{\exp((X\Phi)_{ij})}{\sum_{j'=1}^{np} \exp((X\Phi)_{ij'})}
\quad \text{(eq. 2, softmax over slots)}.
$$

Slot $s$ takes $\tilde X_s = \sum_i D_{is} X_i$ and belongs to expert $\lfloor s/p \rfloor$, which
computes $\tilde Y_s = f_{\lfloor s/p \rfloor}(\tilde X_s)$; token $i$ receives
$Y_i = \sum_s C_{is} \tilde Y_s$. Nothing is dropped, no token is left out, there is no auxiliary
loss, and the layer is permutation-equivariant in the tokens.

**Normalization** (Sec. 2.3, Alg. 2): the router's copy of the tokens is $\ell_2$-normalized along
$d$, each slot vector too, and a learned scalar multiplies the result, so the logits are
$\text{scale} \cdot \cos(x_i, \phi_s)$. As in the official code it is always on
(`normalize=True`), the scale starts at 1, $\|v\|$ is computed as $\sqrt{\sum v^2 + 10^{-6}}$, and
the experts receive the *raw* tokens (only the router sees normalized ones). The slot vectors are
drawn from $\mathcal N(0, 1/d)$ (only their direction matters under normalization; vmoe uses
LeCun-normal).

`MoELayer(..., router="soft_moe")` runs the whole layer: dispatch, one batched matmul per expert
projection over all slots, combine. The softmaxes run over the tokens of **one sequence** (an image
in the paper): pass `[batch, seq, D]`, or `[T, D]` with `sequence_length`; padding tokens take no
dispatch weight and get a zero output.

Deviations and limits: the router math runs in float32 (vmoe uses the model's dtype and casts the
dispatched tokens to bfloat16); vmoe's optional logit noise (`noise_std`, 0 in every released
config) is not offered. **Not causal**: every slot mixes every token, so a token's output depends on
later tokens; the paper (Sec. 6, "Auto-regressive decoding") leaves causal use open, and this
router reports `causal = False`. The number of slots is fixed by `slots_per_expert` (the released
configs use 1 slot per expert); the paper's alternative, slots derived from the sequence length
and a capacity factor, ties the parameters to one sequence length and is not offered.

**HOMOE** (Dat et al. 2023, arXiv 2311.14747; renamed HOPE, WACV 2025) fuses image features with
prototypes retrieved from a Modern Hopfield memory through a Soft MoE. Its title and abstract name
the component as Soft MoE; the method section (expert and slot counts, what the tokens are) could
not be read, so the `homoe` preset is Soft MoE unchanged, with that deviation stated.

## Usage

```python
import torch, impls

layer = impls.MoELayer(d_model=32, d_hidden=64, num_experts=4, router="soft_moe", slots_per_expert=2)
x = torch.randn(3, 10, 32)                                  # 3 sequences of 10 tokens
y, plan = layer(x)
print(plan.dispatch_BLS.sum(1)[0, :4])                      # every slot: weights over tokens sum to 1
print(plan.combine_BLS.sum(-1)[0, :4])                      # every token: weights over slots sum to 1
perm = torch.randperm(10)
assert torch.allclose(layer(x[:, perm])[0], y[:, perm], atol=1e-5)  # permutation-equivariant
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from impls.plan import SlotPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import RouterConfig, SequenceRouter, SequenceRouterConfig

__all__ = ["HOMOE", "SOFT_MOE", "SoftMoEConfig", "SoftMoERouter", "l2_normalize"]

NORM_EPS = 1e-6
"""Inside the square root of the norm, as in vmoe's ``normalize``."""


def l2_normalize(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``v / sqrt(sum(v**2) + 1e-6)`` along ``dim`` (Soft MoE's normalization, vmoe's form)."""
    return v * torch.rsqrt(v.square().sum(dim, keepdim=True) + NORM_EPS)


@dataclass(frozen=True, kw_only=True)
class SoftMoEConfig(SequenceRouterConfig):
    """Options of ``SoftMoERouter``.

    Attributes:
        slots_per_expert: ``p``, slots each expert processes per sequence.
        normalize: l2-normalize tokens and slot vectors, times a learned scale (Sec. 2.3).
        scale_init: initial value of that scale (1 in the official code).
    """

    slots_per_expert: int = 1
    normalize: bool = True
    scale_init: float = 1.0

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.k != 1:
            raise ValueError("Soft MoE has no k: every token reaches every slot (leave k=1)")
        if not isinstance(self.slots_per_expert, int) or self.slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be an int >= 1, got {self.slots_per_expert!r}")
        if not (math.isfinite(self.scale_init) and self.scale_init > 0):
            raise ValueError(f"scale_init must be a finite number > 0, got {self.scale_init}")


@register_router
class SoftMoERouter(SequenceRouter):
    """Soft MoE slots (Puigcerver et al., ICLR 2024, eqs. 1-2, Alg. 2): dispatch and combine weights."""

    name = "soft_moe"
    papers = ("soft-moe", "homoe")
    causal = False
    plan_type = "slots"
    Config = SoftMoEConfig
    config: SoftMoEConfig

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        cfg = self.config
        # gate.weight holds Phi transposed: one row per slot, slot s belongs to expert s // p
        self.gate = nn.Linear(d_model, num_experts * cfg.slots_per_expert, bias=False, dtype=torch.float32)
        nn.init.normal_(self.gate.weight, std=d_model**-0.5)
        self.scale = nn.Parameter(torch.tensor(float(cfg.scale_init))) if cfg.normalize else None

    @property
    def max_experts_per_token(self) -> int:
        return self.num_experts

    @property
    def combine_normalization(self) -> float:
        return 1.0  # every valid token's combine weights over the slots

    @property
    def num_slots(self) -> int:
        return self.num_experts * self.config.slots_per_expert

    def slot_logits(self, x_BLD: torch.Tensor) -> torch.Tensor:
        """``[B, L, S]``: ``scale * cos(x, phi)`` when normalizing, else ``x Phi``."""
        phi_SD = self.gate.weight.float()
        if self.scale is None:
            return x_BLD @ phi_SD.T
        return l2_normalize(x_BLD) @ (self.scale.float() * l2_normalize(phi_SD)).T

    def route_sequences(self, x_BLD: torch.Tensor, token_mask_BL: torch.Tensor) -> SlotPlan:
        logits_BLS = self.slot_logits(x_BLD)
        valid = token_mask_BL[..., None]
        lowest = torch.finfo(logits_BLS.dtype).min
        masked = logits_BLS.masked_fill(~valid, lowest)
        # a sequence of padding only: its columns are uniform over padding, then zeroed by the mask
        dispatch = torch.where(valid, masked.softmax(dim=1), logits_BLS.new_zeros(()))
        combine = torch.where(valid, logits_BLS.softmax(dim=-1), logits_BLS.new_zeros(()))
        return SlotPlan(
            dispatch_BLS=dispatch,
            combine_BLS=combine,
            logits_BLS=logits_BLS,
            slots_per_expert=self.config.slots_per_expert,
            token_mask_BL=token_mask_BL,
        )


SOFT_MOE = register_preset(
    Preset(
        name="soft_moe_b16",
        router="soft_moe",
        options={"slots_per_expert": 1},
        num_experts=128,
        papers=("soft-moe",),
        description=(
            "Soft MoE B/16 (Puigcerver et al., ICLR 2024; vmoe `pretrain_jft4b` config): 128 experts with "
            "one slot each for 196 image tokens, in the last 6 blocks, normalized logits."
        ),
        deviations="float32 router math; vmoe's optional logit noise is not offered.",
    )
)

HOMOE = register_preset(
    Preset(
        name="homoe",
        router="soft_moe",
        options={"slots_per_expert": 1},
        papers=("homoe",),
        description=(
            "HOMOE / HOPE (Dat et al. 2023, arXiv 2311.14747): the Soft MoE that fuses image features "
            "with prototypes retrieved from a Modern Hopfield memory."
        ),
        deviations=(
            "Soft MoE unchanged: the paper's title and abstract name Soft MoE, but its method section "
            "(expert and slot counts, which tokens are mixed) could not be read; pass num_experts."
        ),
    )
)
