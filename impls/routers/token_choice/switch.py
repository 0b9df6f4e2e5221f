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

Two options serve the papers that use this gate with a twist. `drop_policy="random"` (any router)
keeps a uniformly random subset of an overflowing expert's tokens in training instead of the
earliest ones: DeepSpeed-MoE's **Random Token Selection**, with which Z-code M3 (Kim et al. 2021)
was trained. `selection_noise` adds $r_i \sim \mathcal{U}(0, c)$ to each logit for the *choice*
only, the weights staying $\operatorname{softmax}(h)$: the noisy top-1 router whose learning
dynamics Chen et al. (NeurIPS 2022, Sec. 3) analyze, started at zero (`zero_init`) so that early
routing is uniformly random.

## Presets and what is confirmed

| preset | E | k | CF train / eval | jitter | loss weights |
|---|---|---|---|---|---|
| `switch_base` | 128 | 1 | 1.25 / 2.0 | $10^{-2}$ | aux $10^{-2}$ |
| `st_moe` | 32 | 2 | 1.25 / 2.0 | 0 | aux $10^{-2}$, z $10^{-3}$ |
| `openmoe` | 32 | 2 | 1.25 / 2.0, min 4 | 0 | aux $10^{-2}$, z $10^{-3}$ |
| `z_code_m3` | caller's | 1 | 1.0 / 1.0, min 4, RTS | 0 | aux $10^{-2}$ |
| `chen_2022_top1` | caller's | 1 | dropless | $\mathcal{U}(0,1)$ selection noise, zero init | none |

`switch_base`: the aux weight is confirmed from the paper and CF 1.25 is one of its settings;
eval CF 2.0 and the jitter value follow the T5X/Mesh-TF configurations. `st_moe`: all values
confirmed from the paper and its reference transcriptions. `openmoe`: ColossalAI's OpenMoE-8B
configuration; the loss weights are assumed from ST-MoE. `z_code_m3`: DeepSpeed-MoE's top-1
defaults (the paper says its system is DeepSpeed-MoE; its own text was not read here, so $k$, CF
and the weight are not confirmed from it). `chen_2022_top1`: the zero start, $\mathcal{U}[0,1]$
noise and softmax weight are the paper's and its released code's (the code also adds the noise at
test time; here evaluation is noise-free).

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
from torch import nn

from impls.functional import load_balance_loss, topk, z_loss
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig

__all__ = ["SwitchConfig", "SwitchRouter"]


@dataclass(frozen=True, kw_only=True)
class SwitchConfig(RouterConfig):
    """Options of ``SwitchRouter`` (those of ``impls.RouterConfig``; ``k`` 1 by default).

    Attributes:
        selection_noise: in training, add ``r ~ U(0, selection_noise)`` to every logit for the
            choice of the experts only (the weights stay ``softmax(h)``): the noisy top-1 routing
            of Chen et al. 2022. 0 disables it.
        zero_init: start the gate at zero (Chen et al. 2022's initialization).
    """

    k: int = 1
    selection_noise: float = 0.0
    zero_init: bool = False

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if not self.selection_noise >= 0:
            raise ValueError(f"selection_noise must be >= 0, got {self.selection_noise}")


@register_router
class SwitchRouter(Router):
    """Token-choice top-k router with raw softmax weights (Switch Transformer, ST-MoE, OpenMoE).

    Fedus, Zoph, Shazeer, "Switch Transformers: Scaling to Trillion Parameter Models with Simple
    and Efficient Sparsity", 2021, arXiv 2101.03961 (eq. 1-6). Zoph et al., "ST-MoE: Designing
    Stable and Transferable Sparse Expert Models", 2022, arXiv 2202.08906 (eq. 5, z-loss).
    Xue et al., "OpenMoE: An Early Effort on Open Mixture-of-Experts Language Models", 2024,
    arXiv 2402.01739. Kim et al., "Scalable and Efficient MoE Training for Multitask Multilingual
    Models" (Z-code M3), 2021, arXiv 2109.10465. Chen, Deng, Wu, Gu, Li, "Towards Understanding
    the Mixture-of-Experts Layer in Deep Learning", NeurIPS 2022, arXiv 2208.02813 (Sec. 3:
    noisy top-1 routing of a linear gate).
    """

    name = "switch"
    papers = ("switch-transformer", "st-moe", "openmoe", "z-code-m3", "chen-2022")
    causal = True
    Config = SwitchConfig

    @property
    def combine_normalization(self) -> str:
        return "at_most_one"

    def __init__(self, d_model: int, num_experts: int, config=None, **options):
        super().__init__(d_model, num_experts, config, **options)
        if self.config.zero_init:
            nn.init.zeros_(self.gate.weight)

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        probs_TE = torch.softmax(logits_TE, dim=-1)
        noise = self.config.selection_noise
        if self.training and noise > 0:  # noise picks the experts; the weights stay the softmax's
            ids_TK = topk(logits_TE.detach() + noise * torch.rand_like(logits_TE), self.config.k)[1]
            w_TK = probs_TE.gather(1, ids_TK)
        else:
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
Z_CODE_M3 = register_preset(
    Preset(
        name="z_code_m3",
        router="switch",
        options={
            "k": 1,
            "capacity_factor": 1.0,
            "eval_capacity_factor": 1.0,
            "min_capacity": 4,
            "drop_policy": "random",
        },
        loss_coefficients={"load_balance": 1e-2},
        papers=("z-code-m3",),
        description=(
            "Z-code M3 (Kim et al. 2021, arXiv 2109.10465) as trained with DeepSpeed-MoE: top-1 softmax "
            "gate, capacity factor 1.0 (train and eval), minimum capacity 4, Random Token Selection."
        ),
        deviations=(
            "A standard gate: the values are DeepSpeed-MoE's top-1 defaults, the system the paper says it "
            "is built on; the paper's own text (its k, capacity factor and loss weight) was not read "
            "here, and its expert-pruning and expert-aggregation methods are not modelled."
        ),
    )
)
CHEN_2022_TOP1 = register_preset(
    Preset(
        name="chen_2022_top1",
        router="switch",
        options={"k": 1, "selection_noise": 1.0, "zero_init": True},
        loss_coefficients={},
        papers=("chen-2022",),
        description=(
            "Chen et al. (NeurIPS 2022, arXiv 2208.02813), the router of their analysis: a linear gate "
            "started at zero, top-1 selection of h(x) + r with r ~ U[0, 1] per expert, combine weight "
            "softmax(h(x)) of the chosen expert, no balance loss."
        ),
        deviations=(
            "A standard gate with uniform selection noise. The paper routes on the sum of an example's "
            "patches (pass that sum as the token), its experts are two-layer CNNs with cubic activation "
            "trained by normalized gradient descent (not part of a router), and its released code adds "
            "the noise at test time too; here evaluation is noise-free."
        ),
    )
)
