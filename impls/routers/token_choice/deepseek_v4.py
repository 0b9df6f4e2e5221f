r"""DeepSeek-V4 routing (DeepSeek-AI 2026): sqrt-softplus affinities, and hash routing in the first layers.

DeepSeek-V4 keeps DeepSeek-V3's router (fine-grained routed experts plus a shared expert, a
selection-only bias updated by the loss-free sign rule, a light sequence-wise balance loss) with
two changes (Sec. 2.1):

* the affinity is $s = \sqrt{\operatorname{softplus}(x W^\top)}$ instead of the sigmoid, and the
  limit on routing target nodes is gone (no expert groups);
* the dense FFNs of the first blocks become MoE layers with **hash routing**: a token's $k$ experts
  are read from a fixed table by its *input token id*, $T_i = \text{tid2eid}[v_i]$ (Roller et al.
  2021), with no bias; their combine weights are still the token's affinities,
  $w = s_{T_i} / \sum_{r \in T_i} s_r \cdot \gamma$.

So a DeepSeek-V4 model routes with two kinds of layer: `deepseek_v4_routers(...)` builds the whole
stack (hash routers for the first `num_hash_layers`, learned ones after), and the presets
`deepseek_v4_flash` / `deepseek_v4_pro` (learned layers) and `deepseek_v4_flash_hash` /
`deepseek_v4_pro_hash` (hash layers) give each kind. The hash router needs `token_ids`:
`router(x, token_ids=ids)`.

**The table.** DeepSeek ships `tid2eid` in the checkpoint without saying how it was built (only
"a predefined hash function of the token id"). `hash_table()` builds one: token ids in order of
decreasing frequency, each to the $k$ currently least-loaded experts, the load of each growing by
the token's frequency over $k$ (J. Su's greedy construction, kexue.fm/archives/11750); without
frequencies every id counts the same, after a seeded shuffle, which gives every expert
$\lfloor V k / E \rfloor$ or one more ids. Load a released table with `router.tid2eid.copy_(...)`.

## Defaults and what is confirmed

From the paper (Sec. 2.1, 4.2) and the released configurations: Flash 256 routed + 1 shared
experts, Pro 384 + 1, top-6, `scoring_func = sqrtsoftplus`, renormalized weights times
`routed_scaling_factor` 1.5 (Flash) or 2.5 (Pro), the first 3 MoE layers hash-routed, bias update
speed 0.001, sequence-wise balance weight $10^{-4}$; the vocabulary has 129 280 ids.

**Deviations.** The hash table is built as described above, not DeepSeek's (unpublished). The
experts' SwiGLU clamp (linear branch to $[-10, 10]$, gate capped at 10) and Anticipatory Routing
are outside the router. The hash layers return only the z-loss (no balance loss: their load is
the table's).

## Usage

```python
import torch
from impls.routers.token_choice.deepseek_v4 import deepseek_v4_routers

routers = deepseek_v4_routers(64, num_layers=5, variant="flash", vocab_size=1000)
ids = torch.randint(0, 1000, (2, 8))
x = torch.randn(2, 8, 64)
plans = [r(x, token_ids=ids) if r.routing_inputs else r(x) for r in routers]
```
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from impls.functional import z_loss
from impls.plan import RoutingPlan
from impls.registry import Preset, build_router, register_preset, register_router
from impls.router import RouterConfig
from impls.routers.token_choice.deepseek import DeepSeekConfig, DeepSeekRouter

__all__ = ["DeepSeekV4HashConfig", "DeepSeekV4HashRouter", "deepseek_v4_routers", "hash_table"]

V4_VOCAB = 129280


def hash_table(
    vocab_size: int, num_experts: int, k: int, *, counts_V: torch.Tensor | None = None, seed: int = 0
) -> torch.Tensor:
    """``long [V, k]``: each token id's ``k`` distinct experts, greedily balancing the expected load.

    Ids by decreasing frequency (``counts_V``; without it, a seeded shuffle with equal weights),
    each to the ``k`` least-loaded experts (ties: lower index), whose loads grow by its weight / k.
    A one-off build over the vocabulary (a heap, ``O(V k log E)``), not part of routing.
    """
    if not 1 <= k <= num_experts:
        raise ValueError(f"hash_table: need 1 <= k <= num_experts, got k={k}, num_experts={num_experts}")
    if counts_V is None:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(vocab_size, generator=g).tolist()
        weight = [1.0] * vocab_size
    else:
        if counts_V.shape != (vocab_size,):
            raise ValueError(f"counts_V must have shape ({vocab_size},), got {tuple(counts_V.shape)}")
        c = counts_V.detach().to("cpu", torch.float64).tolist()
        order = sorted(range(vocab_size), key=lambda v: (-c[v], v))
        weight = c
    heap = [(0.0, e) for e in range(num_experts)]
    table = [[0] * k for _ in range(vocab_size)]
    for v in order:
        picked = [heapq.heappop(heap) for _ in range(k)]
        for j, (load, e) in enumerate(picked):
            table[v][j] = e
            heapq.heappush(heap, (load + weight[v] / k, e))
    return torch.tensor(table, dtype=torch.long)


@dataclass(frozen=True, kw_only=True)
class DeepSeekV4HashConfig(DeepSeekConfig):
    """Options of ``DeepSeekV4HashRouter``.

    Attributes:
        vocab_size: ids the table covers (required).
        table_seed: seed of the table's shuffle (see ``hash_table``).
    """

    k: int = 6
    score_func: Literal["softmax", "sigmoid", "sqrt_softplus"] = "sqrt_softplus"
    normalize: bool = True
    routed_scaling_factor: float = 1.5
    vocab_size: int | None = None
    table_seed: int = 0

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(
                f"vocab_size must be an int >= 1 (the hash table's size), got {self.vocab_size!r}"
            )
        if self.aux_free_bias or self.n_group != 1:
            raise ValueError("hash layers have no bias and no expert groups (aux_free_bias=False, n_group=1)")
        if self.has_capacity:
            raise ValueError("hash layers are dropless; capacity_factor is not supported")


@register_router
class DeepSeekV4HashRouter(DeepSeekRouter):
    """DeepSeek-V4's hash layers: experts from a token-id table, weights from the sqrt-softplus affinities.

    DeepSeek-AI, "DeepSeek-V4: Towards Highly Efficient Million-Token Context Intelligence",
    2026, arXiv 2606.19348 (Sec. 2.1); hash routing after Roller et al. 2021, arXiv 2106.04426.
    """

    name = "deepseek_v4_hash"
    papers = ("deepseek-v4",)
    Config = DeepSeekV4HashConfig
    config: DeepSeekV4HashConfig
    routing_inputs = ("token_ids",)

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        cfg = self.config
        self.register_buffer("tid2eid", hash_table(cfg.vocab_size, num_experts, cfg.k, seed=cfg.table_seed))

    def input_ranges(self) -> dict[str, int]:
        return {"token_ids": self.config.vocab_size}

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        cfg = self.config
        scores_TE = self.affinities(logits_TE)
        ids_TK = self.tid2eid[self.inputs["token_ids"]]
        w_TK = scores_TE.gather(1, ids_TK)
        if cfg.normalize:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        w_TK = w_TK * cfg.routed_scaling_factor
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        losses = {"z_loss": z_loss(logits_TE, token_mask_T)}
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        return RoutingPlan(ids_TK, w_TK, keep_TK, probs_TE, logits_TE, losses, token_mask_T)


_V4 = {
    "k": 6,
    "score_func": "sqrt_softplus",
    "normalize": True,
    "aux_free_bias": True,
    "bias_update_rate": 1e-3,
    "balance_counts": "unbiased_topk",
}
_V4_SOURCE = "DeepSeek-V4 (DeepSeek-AI 2026, arXiv 2606.19348, Sec. 2.1 and 4.2)"
_V4_DEVIATIONS = (
    "Values from the paper and the released config.json; the experts' SwiGLU clamp is not modelled."
)

DEEPSEEK_V4_FLASH = register_preset(
    Preset(
        name="deepseek_v4_flash",
        router="deepseek",
        options={**_V4, "routed_scaling_factor": 1.5},
        num_experts=256,
        layer={"activation": "swiglu", "num_shared_experts": 1},
        loss_coefficients={"seq_load_balance": 1e-4},
        papers=("deepseek-v4",),
        description=(
            f"{_V4_SOURCE}, Flash, learned layers: 1 shared + 256 routed experts, top-6 of sqrt(softplus) "
            "affinities with a loss-free selection bias (u = 0.001), renormalized x 1.5, no expert groups."
        ),
        deviations=_V4_DEVIATIONS,
    )
)
DEEPSEEK_V4_PRO = register_preset(
    Preset(
        name="deepseek_v4_pro",
        router="deepseek",
        options={**_V4, "routed_scaling_factor": 2.5},
        num_experts=384,
        layer={"activation": "swiglu", "num_shared_experts": 1},
        loss_coefficients={"seq_load_balance": 1e-4},
        papers=("deepseek-v4",),
        description=(
            f"{_V4_SOURCE}, Pro, learned layers: 1 shared + 384 routed experts, top-6 of sqrt(softplus) "
            "affinities with a loss-free selection bias (u = 0.001), renormalized x 2.5, no expert groups."
        ),
        deviations=_V4_DEVIATIONS,
    )
)
DEEPSEEK_V4_FLASH_HASH = register_preset(
    Preset(
        name="deepseek_v4_flash_hash",
        router="deepseek_v4_hash",
        options={"k": 6, "routed_scaling_factor": 1.5, "vocab_size": V4_VOCAB},
        num_experts=256,
        layer={"activation": "swiglu", "num_shared_experts": 1},
        papers=("deepseek-v4",),
        description=f"{_V4_SOURCE}, Flash, the first 3 MoE layers: 6 of 256 experts by token id.",
        deviations="The token-id table is built by hash_table() (DeepSeek's own is unpublished).",
    )
)
DEEPSEEK_V4_PRO_HASH = register_preset(
    Preset(
        name="deepseek_v4_pro_hash",
        router="deepseek_v4_hash",
        options={"k": 6, "routed_scaling_factor": 2.5, "vocab_size": V4_VOCAB},
        num_experts=384,
        layer={"activation": "swiglu", "num_shared_experts": 1},
        papers=("deepseek-v4",),
        description=f"{_V4_SOURCE}, Pro, the first 3 MoE layers: 6 of 384 experts by token id.",
        deviations="The token-id table is built by hash_table() (DeepSeek's own is unpublished).",
    )
)


def deepseek_v4_routers(
    d_model: int,
    num_layers: int,
    *,
    variant: Literal["flash", "pro"] = "flash",
    num_hash_layers: int = 3,
    vocab_size: int = V4_VOCAB,
    **options: Any,
) -> nn.ModuleList:
    """The routers of a DeepSeek-V4 stack: hash routers for the first ``num_hash_layers``, learned after.

    Every hash layer gets its own table (seed = the layer index). ``options`` go to every router
    (e.g. ``num_experts=`` for a smaller model).
    """
    if variant not in ("flash", "pro"):
        raise ValueError(f"variant must be 'flash' or 'pro', got {variant!r}")
    if not 0 <= num_hash_layers <= num_layers:
        raise ValueError(f"num_hash_layers must be in [0, num_layers={num_layers}], got {num_hash_layers}")
    routers = []
    for layer in range(num_layers):
        if layer < num_hash_layers:
            opts = {"vocab_size": vocab_size, "table_seed": layer, **options}
            routers.append(build_router(f"deepseek_v4_{variant}_hash", d_model=d_model, **opts))
        else:
            routers.append(build_router(f"deepseek_v4_{variant}", d_model=d_model, **options))
    return nn.ModuleList(routers)
