r"""Merging lightweight experts (MoV, MoLoRA, Omni-SMoLA): per-token soft mixtures of adapters.

When the experts are small adapters on a frozen model, averaging them per token is cheap, so
these methods merge *every* expert for *every* token instead of picking a few.

**MoV and MoLoRA** (Zadouri, Üstün, Ahmadian, Ermiş, Locatelli & Hooker, "Pushing Mixture of
Experts to the Limit: Extremely Parameter Efficient MoE for Instruction Tuning", ICLR 2024,
arXiv 2309.05444; official code `for-ai/parameter-efficient-moe`, `src/mov.py`, `src/molora.py`).
A router gives each token $x$ the weights $s = \operatorname{softmax}(W_g x)$ (linear, no bias,
$\mathcal N(0, 0.02^2)$ init, float32). *MoV* merges $E$ (IA)³ vectors $l_e$ (all initialized to
ones) and rescales an activation elementwise:

$$
h' = h \odot \sum_{e=1}^{E} s_e(h)\, l_e ,
$$

applied, as (IA)³ is, to the attention keys and values and to the feed-forward intermediate
activation, with the router reading the very activation it scales (`MoVScaler`). *MoLoRA* mixes
LoRA experts on a frozen projection $W_0$ (`MoLoRALinear`):

$$
y = W_0 x + \frac{\alpha}{r} \sum_{e=1}^{E} s_e(x)\, B_e A_e x ,
$$

i.e. the merged update $\Delta W = \sum_e s_e B_e A_e$ ($A_e \sim \mathcal N(0, 0.02^2)$,
$B_e = 0$, so training starts at the frozen model). Neither uses a balancing loss. The official
code's optional top-$k$ keeps the $k$ largest weights **without** renormalizing them (`k` here).

**Omni-SMoLA** (Wu, Hu, Wang, Pang & Soricut, "Omni-SMoLA: Boosting Generalist Multimodal Models
with Soft Mixture of Low-rank Experts", CVPR 2024, arXiv 2312.00968) adds many low-rank experts
residually to a frozen multimodal model and mixes them "with the Soft MoE approach", with expert
sets per modality and a multimodal one. `SMoLALinear` does that on a frozen projection: Soft MoE's
dispatch and combine weights (`soft_moe`, Puigcerver et al. eqs. 1-2) mix the tokens into slots,
each slot goes through its low-rank expert $B_e A_e$, and the combined result is added to
$W_0 x$; with `modalities=M` there is one multimodal set over all tokens plus one set per
modality over that modality's tokens only (given as `modality_ids`), and their outputs add up.
Deviation: the paper's method section could not be read, so the placement of the experts, their
ranks and counts, and how the sets are combined follow its abstract, not its equations; the
router math is Soft MoE's unchanged (`smola` below, a `soft_moe` router under its own name).

## Usage

```python
import torch, impls
from impls.routers.expert_merging.lightweight import MoLoRALinear, MoVScaler, SMoLALinear

mov = MoVScaler(width=64, num_experts=10)                   # (IA)^3 experts on a 64-wide activation
h = torch.randn(2, 5, 64)
h2, plan = mov(h)
assert torch.allclose(h2, h)                                # all vectors start at ones: identity
lora = MoLoRALinear(torch.nn.Linear(32, 48), num_experts=10, rank=4, alpha=16)
y, plan = lora(torch.randn(2, 5, 32))                       # frozen W0 x + mixed low-rank updates
smola = SMoLALinear(torch.nn.Linear(32, 32), num_experts=4, rank=2, modalities=2)
ids = torch.tensor([[0, 0, 1, 1, 1]]).expand(2, 5)          # e.g. 0 = text, 1 = image tokens
y, plans = smola(torch.randn(2, 5, 32), modality_ids=ids)
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from impls.functional import topk
from impls.plan import MergePlan
from impls.registry import Preset, register_preset, register_router
from impls.router import RouterConfig, SequenceRouter, SequenceRouterConfig
from impls.routers.token_merging.soft_moe import SoftMoERouter

__all__ = [
    "MOLORA",
    "MOV",
    "OMNI_SMOLA",
    "MoLoRALinear",
    "MoVScaler",
    "SMoLALinear",
    "SMoLARouter",
    "TokenMergeConfig",
    "TokenMergeRouter",
]


@dataclass(frozen=True, kw_only=True)
class TokenMergeConfig(SequenceRouterConfig):
    """Options of ``TokenMergeRouter``.

    Attributes:
        k: ``None`` merges all experts (soft merging); an int keeps each token's ``k`` largest
            weights, not renormalized (the official code's top-k option).
        init_std: standard deviation of the gate's initial weights.
    """

    k: int | None = None  # type: ignore[assignment]
    init_std: float = 0.02

    def validate(self, num_experts: int) -> None:
        if self.k is not None and not 1 <= self.k <= num_experts:
            raise ValueError(f"k must be None or in [1, num_experts={num_experts}], got k={self.k}")
        if not self.init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std}")
        self.reject_token_choice_options()


@register_router
class TokenMergeRouter(SequenceRouter):
    """MoV / MoLoRA router (Zadouri et al., ICLR 2024): a softmax over experts for every token."""

    name = "mov"
    papers = ("mov",)
    causal = True
    plan_type = "merge"
    Config = TokenMergeConfig
    config: TokenMergeConfig

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        nn.init.normal_(self.gate.weight, std=self.config.init_std)

    @property
    def max_experts_per_token(self) -> int:
        return self.config.k or self.num_experts

    @property
    def combine_normalization(self) -> float | str:
        k = self.config.k
        return 1.0 if k is None or k == self.num_experts else "at_most_one"

    def route_sequences(self, x_BLD: torch.Tensor, token_mask_BL: torch.Tensor) -> MergePlan:
        L = x_BLD.shape[1]
        logits = self.compute_logits(x_BLD)
        probs = logits.softmax(-1)
        weights = probs
        if self.config.k is not None and self.config.k < self.num_experts:
            _, ids = topk(probs, self.config.k)
            weights = torch.zeros_like(probs).scatter(-1, ids, probs.gather(-1, ids))
        weights = weights * token_mask_BL[..., None]
        return MergePlan(weights, probs, logits, group_length=1, seq_len=L, token_mask_BL=token_mask_BL)


def _merge_router(
    width: int, num_experts: int, router: SequenceRouter | None, **options: Any
) -> SequenceRouter:
    if router is None:
        return TokenMergeRouter(width, num_experts, **options)
    if router.d_model != width or router.num_experts != num_experts:
        raise ValueError(
            f"router has d_model={router.d_model}, num_experts={router.num_experts}; "
            f"expected {width} and {num_experts}"
        )
    return router


class MoVScaler(nn.Module):
    """MoV: a mixture of (IA)³ vectors rescaling an activation of width ``width``.

    ``forward(h, token_mask=None)`` takes ``[B, L, width]`` (or ``[B, L, heads, width]`` for the
    per-head keys and values, routed per head) and returns ``(h * merged_vector, plan)``.
    """

    def __init__(self, width: int, num_experts: int, *, router: SequenceRouter | None = None, **options: Any):
        super().__init__()
        self.router = _merge_router(width, num_experts, router, **options)
        self.vectors_EW = nn.Parameter(torch.ones(num_experts, width))

    def forward(
        self, h: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MergePlan]:
        if h.dim() == 4:  # [B, L, heads, width]: one routing decision per head
            B, L, H, W = h.shape
            hm = h.permute(0, 2, 1, 3).reshape(B * H, L, W)
            mask = None if token_mask is None else token_mask.repeat_interleave(H, dim=0)
            out, plan = self.forward(hm, mask)
            return out.view(B, H, L, W).permute(0, 2, 1, 3), plan
        plan = self.router(h, token_mask)
        scale = plan.token_weights() @ self.vectors_EW.float()
        if plan.token_mask_BL is not None:  # padding and non-finite tokens keep their activation
            scale = torch.where(plan.token_mask_BL[..., None], scale, scale.new_ones(()))
        return (h.float() * scale).to(h.dtype), plan


class MoLoRALinear(nn.Module):
    """MoLoRA: a frozen ``nn.Linear`` plus a per-token mixture of ``E`` LoRA experts of rank ``rank``."""

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int,
        rank: int,
        alpha: float = 16.0,
        *,
        router: SequenceRouter | None = None,
        freeze_base: bool = True,
        **options: Any,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MoLoRALinear: base must be an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"MoLoRALinear: rank must be an int >= 1, got {rank!r}")
        self.base = base.requires_grad_(not freeze_base)
        self.rank, self.scaling = rank, alpha / rank
        self.router = _merge_router(base.in_features, num_experts, router, **options)
        self.A_ERI = nn.Parameter(torch.randn(num_experts, rank, base.in_features) * 0.02)
        self.B_EOR = nn.Parameter(torch.zeros(num_experts, base.out_features, rank))

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MergePlan]:
        plan = self.router(x, token_mask)
        s = plan.token_weights().view(*x.shape[:-1], -1)
        ax = torch.einsum("...i,eri->...er", x.float(), self.A_ERI.float())
        delta = torch.einsum("...er,eor->...o", s[..., None] * ax, self.B_EOR.float())
        return self.base(x) + (self.scaling * delta).to(x.dtype), plan


@register_router
class SMoLARouter(SoftMoERouter):
    """Omni-SMoLA's router: Soft MoE's dispatch and combine (eqs. 1-2) for low-rank experts."""

    name = "smola"
    papers = ("omni-smola",)


class SMoLALinear(nn.Module):
    """Omni-SMoLA on a frozen ``nn.Linear``: Soft MoE over low-rank experts, per modality and shared.

    ``forward(x, token_mask=None, modality_ids=None)`` takes ``[B, L, in]``; with ``modalities=M``
    it needs ``modality_ids`` (``long [B, L]`` in ``[0, M)``) and returns ``(y, plans)``, the
    multimodal set's plan first, then one per modality.
    """

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int,
        rank: int,
        *,
        modalities: int = 0,
        slots_per_expert: int = 1,
        freeze_base: bool = True,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SMoLALinear: base must be an nn.Linear, got {type(base).__name__}")
        if not isinstance(modalities, int) or modalities < 0:
            raise ValueError(f"SMoLALinear: modalities must be an int >= 0, got {modalities!r}")
        self.base = base.requires_grad_(not freeze_base)
        self.modalities = modalities
        sets = 1 + modalities
        d_in, d_out = base.in_features, base.out_features
        self.routers = nn.ModuleList(
            SMoLARouter(d_in, num_experts, slots_per_expert=slots_per_expert) for _ in range(sets)
        )
        self.A_SERI = nn.Parameter(torch.randn(sets, num_experts, rank, d_in) * d_in**-0.5)
        self.B_SEOR = nn.Parameter(torch.zeros(sets, num_experts, d_out, rank))

    def forward(
        self,
        x: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        modality_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list]:
        if x.dim() != 3:
            raise ValueError(f"SMoLALinear: x must be [batch, seq, features], got {tuple(x.shape)}")
        if self.modalities:
            if modality_ids is None:
                raise TypeError(f"SMoLALinear: modality_ids is required with modalities={self.modalities}")
            if tuple(modality_ids.shape) != tuple(x.shape[:2]) or modality_ids.dtype.is_floating_point:
                raise ValueError(
                    f"SMoLALinear: modality_ids must be integer ids of shape {list(x.shape[:2])}, got "
                    f"{modality_ids.dtype} {list(modality_ids.shape)}"
                )
            lo, hi = (
                torch.stack([modality_ids.min(), modality_ids.max()]).tolist()
                if modality_ids.numel()
                else (0, 0)
            )
            if lo < 0 or hi >= self.modalities:  # one host sync: a bad id must not index silently
                raise ValueError(f"SMoLALinear: modality_ids must be in [0, {self.modalities})")
        elif modality_ids is not None:
            raise TypeError("SMoLALinear: modality_ids given but modalities=0")
        out = self.base(x)
        plans = []
        for i, router in enumerate(self.routers):
            mask = token_mask
            if i:
                own = modality_ids == i - 1
                mask = own if mask is None else mask & own
            plan = router(x, mask)
            plans.append(plan)
            B, _, S = plan.dispatch_BLS.shape
            E, p = plan.num_experts, plan.slots_per_expert
            xz = torch.where(plan.token_mask_BL[..., None], x.float(), x.new_zeros((), dtype=torch.float32))
            slots = torch.einsum("bls,bld->bsd", plan.dispatch_BLS, xz).view(B, E, p, -1)
            low = torch.einsum("bepd,erd->bepr", slots, self.A_SERI[i].float())
            ys = torch.einsum("bepr,eor->bepo", low, self.B_SEOR[i].float()).reshape(B, S, -1)
            out = out + torch.einsum("bls,bso->blo", plan.combine_BLS, ys).to(out.dtype)
        return out, plans


MOV = register_preset(
    Preset(
        name="mov_10",
        router="mov",
        num_experts=10,
        papers=("mov",),
        description=(
            "MoV-10 (Zadouri et al., ICLR 2024): 10 (IA)³ experts per site, merged per token by a softmax "
            "router; use with `MoVScaler` on keys, values and the FFN activation."
        ),
        deviations="none known for the router; the frozen backbone is the caller's.",
    )
)

MOLORA = register_preset(
    Preset(
        name="molora_10",
        router="mov",
        num_experts=10,
        papers=("mov",),
        description=(
            "MoLoRA-10 (Zadouri et al., ICLR 2024; official `molora.gin`): 10 rank-4 LoRA experts, "
            "alpha 16, mixed per token; use with `MoLoRALinear(base, 10, rank=4, alpha=16)`."
        ),
        deviations="none known for the router; the frozen backbone is the caller's.",
    )
)

OMNI_SMOLA = register_preset(
    Preset(
        name="omni_smola",
        router="smola",
        options={"slots_per_expert": 1},
        papers=("omni-smola",),
        description=(
            "Omni-SMoLA (Wu et al., CVPR 2024): Soft MoE mixing of low-rank experts added to a frozen "
            "multimodal model; use with `SMoLALinear`. Pass num_experts."
        ),
        deviations=(
            "Built from the paper's abstract: expert placement, ranks, counts and the combination of "
            "the modality sets are not taken from its equations."
        ),
    )
)
