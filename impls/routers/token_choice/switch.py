r"""Switch Transformer and ST-MoE routing: fp32 softmax, raw-probability weights, capacity, aux and z-losses.

The Mesh-TensorFlow / T5X line of routers (Switch Transformer, ST-MoE, OpenMoE). The router runs
in float32 whatever the model's precision ("selective precision", Switch Sec. 2.4), optionally
multiplies its input by jitter $x \odot u$, $u \sim \mathcal{U}(1-\varepsilon, 1+\varepsilon)$ in
training, and takes the top-$k$ experts of

$$
p(x) = \operatorname{softmax}(x W_r), \qquad y = \sum_{i \in \operatorname{TopK}(p, k)} p_i(x) \, E_i(x).
$$

The combine weight is the **raw probability** of the chosen expert (Switch eq. 2 with $k = 1$; no
renormalization for $k = 2$ either, as in flaxformer's `TokensChooseMaskedRouter`). Each expert
takes at most

$$
C = \left\lceil \mathrm{CF} \cdot \frac{k \, T}{E} \right\rceil
$$

tokens (Switch eq. 3 for $k = 1$); first choices are served before second choices and, within a
choice, earlier tokens first (so the router stays causal). Overflowing assignments are dropped:
the expert does not compute them and they contribute zero, leaving only the residual.

Losses (unweighted, on the decision **before** capacity):

* `load_balance` $= E \sum_i f_i P_i$ (Switch eq. 4-6), $f_i$ the fraction of assignments routed
  to expert $i$, $P_i$ the mean router probability; $1$ when perfectly balanced. Switch weights it
  with $\alpha = 10^{-2}$.
* `z_loss` $= \frac{1}{T} \sum_t \big(\log \sum_i e^{h_{t,i}}\big)^2$ (ST-MoE eq. 5), weight
  $10^{-3}$ in ST-MoE.

## Presets and what is confirmed

| preset | E | k | CF train / eval | jitter | loss weights |
|---|---|---|---|---|---|
| `switch_base` | 128 | 1 | 1.25 / 2.0 | $10^{-2}$ | aux $10^{-2}$ |
| `st_moe` | 32 | 2 | 1.25 / 2.0 | 0 | aux $10^{-2}$, z $10^{-3}$ |
| `openmoe` | 32 | 2 | 1.25 / 2.0, min 4 | 0 | aux $10^{-2}$, z $10^{-3}$ |

`switch_base`: the aux weight is confirmed from the paper and CF 1.25 is one of its settings;
eval CF 2.0 and the jitter value follow the T5X/Mesh-TF configurations. `st_moe`: all values
confirmed from the paper and its reference transcriptions. `openmoe`: ColossalAI's OpenMoE-8B
configuration; the loss weights are assumed from ST-MoE.

**Deviations.** The lucidrains transcription of Mesh-TF's ST-MoE keeps the second expert only
when its gate clears a threshold (or by a random draw); flaxformer, followed here, keeps it
whenever it fits in capacity. Switch and ST-MoE experts use ReLU/GEGLU; the layer offers GELU
and SwiGLU. Groups (Mesh-TF's `group_size`) are the routed batch itself.

## Usage

```python
import torch, impls

router = impls.build_router("switch_base", d_model=32, num_experts=4)
router.train()
plan = router(torch.randn(16, 32))
print(plan.capacity, plan.fraction_dropped)        # capacity 5 = ceil(1.25 * 16 / 4)
print(plan.losses["load_balance"], plan.losses["z_loss"])

layer = impls.MoELayer(32, 64, router="st_moe", num_experts=4)
x = torch.randn(2, 8, 32)
out, plan = layer(x)
y = x + out                                         # the caller adds the residual
total_aux = plan.aux_loss(layer.loss_coefficients)  # 1e-2 * load_balance + 1e-3 * z_loss
```
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from impls.functional import load_balance_loss, topk, z_loss
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig

__all__ = ["SwitchConfig", "SwitchRouter"]


@dataclass(frozen=True, kw_only=True)
class SwitchConfig(RouterConfig):
    """Options of ``SwitchRouter`` (those of ``impls.RouterConfig``; ``k`` 1 by default)."""

    k: int = 1


@register_router
class SwitchRouter(Router):
    """Token-choice top-k router with raw softmax weights (Switch Transformer, ST-MoE, OpenMoE).

    Fedus, Zoph, Shazeer, "Switch Transformers: Scaling to Trillion Parameter Models with Simple
    and Efficient Sparsity", 2021, arXiv 2101.03961 (eq. 1-6). Zoph et al., "ST-MoE: Designing
    Stable and Transferable Sparse Expert Models", 2022, arXiv 2202.08906 (eq. 5, z-loss).
    Xue et al., "OpenMoE: An Early Effort on Open Mixture-of-Experts Language Models", 2024,
    arXiv 2402.01739.
    """

    name = "switch"
    papers = ("switch-transformer", "st-moe", "openmoe")
    causal = True
    Config = SwitchConfig

    @property
    def combine_normalization(self) -> str:
        return "at_most_one"

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        probs_TE = torch.softmax(logits_TE, dim=-1)
        w_TK, ids_TK = topk(probs_TE, self.config.k)
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        losses = {
            "load_balance": load_balance_loss(probs_TE, ids_TK, token_mask_T),
            "z_loss": z_loss(logits_TE, token_mask_T),
        }
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        return RoutingPlan(ids_TK, w_TK, keep_TK, probs_TE, logits_TE, losses, token_mask_T)


SWITCH_BASE = register_preset(
    Preset(
        name="switch_base",
        router="switch",
        options={"k": 1, "capacity_factor": 1.25, "eval_capacity_factor": 2.0, "jitter_eps": 1e-2},
        num_experts=128,
        loss_coefficients={"load_balance": 1e-2},
        papers=("switch-transformer",),
        description=(
            "Switch-Base (Fedus et al. 2021, arXiv 2101.03961): 128 experts, top-1, capacity factor 1.25, "
            "aux loss 1e-2."
        ),
        deviations=(
            "Evaluation capacity factor 2.0 and jitter 1e-2 follow the T5X/Mesh-TF Switch configurations, "
            "not a value printed in the paper."
        ),
    )
)
ST_MOE = register_preset(
    Preset(
        name="st_moe",
        router="switch",
        options={"k": 2, "capacity_factor": 1.25, "eval_capacity_factor": 2.0},
        num_experts=32,
        loss_coefficients={"load_balance": 1e-2, "z_loss": 1e-3},
        papers=("st-moe",),
        description=(
            "ST-MoE (Zoph et al. 2022, arXiv 2202.08906): top-2, capacity factor 1.25 train / 2.0 eval, "
            "aux 1e-2 and router z-loss 1e-3."
        ),
        deviations=(
            "The second expert is kept whenever it fits in capacity (flaxformer), without a gate threshold."
        ),
    )
)
OPENMOE = register_preset(
    Preset(
        name="openmoe",
        router="switch",
        options={"k": 2, "capacity_factor": 1.25, "eval_capacity_factor": 2.0, "min_capacity": 4},
        num_experts=32,
        loss_coefficients={"load_balance": 1e-2, "z_loss": 1e-3},
        papers=("openmoe",),
        description=(
            "OpenMoE-8B (Xue et al. 2024, arXiv 2402.01739): ST-MoE recipe, 32 experts, top-2, capacity "
            "factor 1.25 / 2.0, minimum capacity 4."
        ),
        deviations="Loss weights are ST-MoE's; OpenMoE's own coefficients are unconfirmed.",
    )
)
