r"""Flextron (Cai et al., ICML 2024): routers that pick a sub-network width per input, via a surrogate.

Flextron turns a trained Transformer into a **nested elastic network**: the hidden units of an
MLP (and the heads of attention) are ranked, and width choice $c$ keeps the first $n_c$ of them,
so every smaller sub-network is a prefix of the larger ones and one set of weights holds them
all. A **router** per layer picks the width, either once for a whole latency budget (*static*)
or per token from its hidden state (*dynamic*, input-adaptive); its "experts" are the widths,

$$
\ell_t = R\big([x_t ; \operatorname{onehot}(b)]\big) \in \mathbb{R}^{C}, \qquad
c_t = \arg\max_c (\ell_{t,c} + g_c), \qquad
y_t = \operatorname{MLP}_{n_{c_t}}(x_t) = W_2 \big(m_{c_t} \odot \sigma(W_1 x_t)\big),
$$

with $m_c$ the prefix mask of the first $n_c$ units, $b$ the requested budget and $g$ Gumbel
noise in training (a straight-through one-hot: weight 1 forward, the gradient of
$\operatorname{softmax}((\ell + g)/\tau)$ backward).

Router training does not backpropagate through the language model. A small **surrogate model**
$S$ is fit to predict the language-modelling loss from the routers' logits alone; once its error
is under a threshold the routers minimize

$$
\mathcal{L}_\text{router} = S(\ell^{(1)}, \dots, \ell^{(L)}) + \lambda\, \mathcal{L}_\text{lat}, \qquad
\mathcal{L}_\text{lat} = \Big( \frac{\sum_l \sum_c \bar p^{(l)}_c \, \text{LUT}_{l,c}}
{\sum_l \text{LUT}_{l,C}} - b \Big)^2,
$$

where the lookup table $\text{LUT}_{l,c}$ holds the measured latency of layer $l$ at width $c$,
$\bar p^{(l)}$ is layer $l$'s mean routing distribution, and $b$ the budget as a fraction of the
full model's latency. The surrogate is then dropped and model and routers are fine-tuned
together.

What is here: `FlextronRouter` (`flextron`; `mode="static"` or `"dynamic"`), the elastic MLP it
drives (`ElasticMLP`, with `rank_units_()` for the importance ranking), the surrogate
(`FlextronSurrogate`: `fit_step()`, `ready()`) and `latency_loss()`. The requested budget is a
routing input: `router(x, budget_ids=...)`, an index into `budgets` per token or per sequence.

## What is confirmed, and what is reconstructed

The paper's body (Sec. 3, its equations and appendix) could not be read for this
implementation; what is **confirmed** comes from its abstract and its Figure 3 caption: nested
elastic MLP and attention layers; static and input-adaptive routers that pick sub-networks
under a latency target; a surrogate model trained to predict the LM loss *from the router logits
only*, router updates starting once its error is below a set threshold; a latency loss matching
the requested to the real latency through a lookup table; joint fine-tuning after the surrogate
is discarded. Everything else is a **reconstruction**, chosen to be the plainest reading of
those statements and stated here so that it can be checked against the paper:

* the router: a two-layer MLP (hidden 128, LeakyReLU 0.1) on the budget one-hot (static) or on
  the hidden state and the budget one-hot (dynamic); top-1 straight-through Gumbel-softmax
  with temperature `tau` (the 128-unit budget MLP and Gumbel sampling are those of NVIDIA's
  later Megatron-LM "Flextron" elastification code, which trains Nemotron Elastic);
* the widths: fractions `width_choices` of the full width, $n_c = \lceil f_c F \rceil$;
* the importance score: the mean absolute activation of a unit on calibration data;
* the surrogate: an MLP on the per-layer mean router probabilities, fit by squared error;
* the latency loss: the squared gap between the expected relative latency and the budget.

Only MLP widths are routed; elastic attention heads are not modelled (route MoH-style head
masks with `impls.routers.token_choice.attention_heads` for that).

## Usage

```python
import torch
from impls.routers.token_choice.flextron import ElasticMLP, FlextronRouter, latency_loss

mlp = ElasticMLP(32, 128, width_choices=(0.25, 0.5, 1.0))
router = FlextronRouter(32, 3, width_choices=(0.25, 0.5, 1.0), budgets=(0.5, 1.0), mode="dynamic")
x = torch.randn(2, 6, 32)
plan = router(x, budget_ids=torch.tensor([0, 1]))          # one budget per sequence
y = mlp(x, plan)                                            # each token at its routed width
lut = torch.tensor([[1.0, 1.6, 2.8]])                       # one layer's latency per width
loss = latency_loss([plan], lut, budget=0.5)
```
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from impls.functional import topk
from impls.plan import RoutingPlan
from impls.registry import register_router
from impls.router import Router, RouterConfig

__all__ = [
    "ElasticMLP",
    "FlextronConfig",
    "FlextronRouter",
    "FlextronSurrogate",
    "latency_loss",
    "width_units",
]


def width_units(width_choices: Sequence[float], d_ff: int) -> list[int]:
    """Hidden units kept by each width choice: ``ceil(f * d_ff)``, at least 1."""
    return [max(1, math.ceil(f * d_ff - 1e-9)) for f in width_choices]


@dataclass(frozen=True, kw_only=True)
class FlextronConfig(RouterConfig):
    """Options of ``FlextronRouter`` (its experts are the width choices, ``num_experts`` of them).

    Attributes:
        width_choices: fractions of the full width, strictly increasing, the last one 1.0; ``None``
            = evenly spaced ``(1/E, 2/E, ..., 1)`` for ``E = num_experts`` choices.
        budgets: the latency budgets the router is trained for (fractions of the full latency);
            ``budget_ids`` index this tuple.
        mode: ``"dynamic"`` (per token, from the hidden state and the budget) or ``"static"`` (from
            the budget only: every token of a budget takes the same width).
        router_hidden: hidden width of the router MLP.
        tau: Gumbel-softmax temperature in training.
        k: must be 1 (one width per token).
    """

    width_choices: tuple[float, ...] | None = None
    budgets: tuple[float, ...] = (0.5, 0.75, 1.0)
    mode: Literal["dynamic", "static"] = "dynamic"
    router_hidden: int = 128
    tau: float = 1.0

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        w = self.widths(num_experts)
        if (
            not w
            or any(not 0 < f <= 1 for f in w)
            or any(b <= a for a, b in itertools.pairwise(w))
            or w[-1] != 1.0
        ):
            raise ValueError(f"width_choices must increase strictly within (0, 1] and end at 1.0, got {w}")
        if len(w) != num_experts:
            raise ValueError(f"num_experts={num_experts} must equal len(width_choices)={len(w)}")
        if not self.budgets or any(not 0 < b <= 1 for b in self.budgets):
            raise ValueError(f"budgets must be fractions in (0, 1], got {self.budgets}")
        if self.mode not in ("dynamic", "static"):
            raise ValueError(f"mode must be 'dynamic' or 'static', got {self.mode!r}")
        if not isinstance(self.router_hidden, int) or self.router_hidden < 1:
            raise ValueError(f"router_hidden must be an int >= 1, got {self.router_hidden!r}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.k != 1:
            raise ValueError(f"Flextron picks one width per token (k=1), got k={self.k}")
        if self.has_capacity:
            raise ValueError("a width choice has no capacity; capacity_factor is not supported")

    def widths(self, num_experts: int) -> tuple[float, ...]:
        """The width fractions (``width_choices``, or the evenly spaced default)."""
        if self.width_choices is None:
            return tuple((i + 1) / num_experts for i in range(num_experts))
        return tuple(float(f) for f in self.width_choices)


@register_router
class FlextronRouter(Router):
    """Flextron's width router: a small MLP on the budget (static) or the token and budget (dynamic).

    Cai, Muralidharan, Heinrich, Yin, Wang, Kautz, Molchanov, "Flextron: Many-in-One Flexible
    Large Language Model", ICML 2024, arXiv 2406.10260 (Fig. 3: surrogate model and latency
    lookup table). The router design is a reconstruction (see the module docstring).
    """

    name = "flextron"
    papers = ("flextron",)
    causal = True
    Config = FlextronConfig
    config: FlextronConfig
    routing_inputs = ("budget_ids",)

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        cfg = self.config
        self.gate = None
        n_in = len(cfg.budgets) + (d_model if cfg.mode == "dynamic" else 0)
        self.mlp = nn.Sequential(
            nn.Linear(n_in, cfg.router_hidden, dtype=torch.float32),
            nn.LeakyReLU(0.1),
            nn.Linear(cfg.router_hidden, num_experts, dtype=torch.float32),
        )

    def input_ranges(self) -> dict[str, int]:
        return {"budget_ids": len(self.config.budgets)}

    @property
    def combine_normalization(self) -> float:
        return 1.0

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``[T, C]`` width logits from the budget one-hot (and the token, in dynamic mode)."""
        cfg = self.config
        b_TB = nn.functional.one_hot(self.inputs["budget_ids"], len(cfg.budgets)).float()
        u_TI = torch.cat([x_TD.float(), b_TB], dim=-1) if cfg.mode == "dynamic" else b_TB
        w1, w2 = self.mlp[0], self.mlp[2]
        h = nn.functional.leaky_relu(nn.functional.linear(u_TI, w1.weight.float(), w1.bias.float()), 0.1)
        r_TC = nn.functional.linear(h, w2.weight.float(), w2.bias.float())
        if cfg.mode == "static":
            r_TC = r_TC + x_TD.sum(-1, keepdim=True) * 0.0  # reads x only to catch non-finite tokens
        return r_TC

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        cfg = self.config
        z_TC = logits_TE
        if self.training:
            u = torch.rand_like(z_TC).clamp(1e-20, 1.0 - 1e-7)
            z_TC = z_TC - torch.log(-torch.log(u))  # Gumbel(0, 1) noise
        probs_TC = torch.softmax(z_TC / cfg.tau, dim=-1)
        ids_TK = topk(z_TC.detach(), 1)[1]
        soft_TK = probs_TC.gather(1, ids_TK)
        w_TK = soft_TK - soft_TK.detach() + 1.0  # straight-through: 1 forward, soft gradient
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        scores_TC = torch.softmax(logits_TE, dim=-1)  # the router's distribution, without noise
        return RoutingPlan(ids_TK, w_TK, keep_TK, scores_TC, logits_TE, {}, token_mask_T)


class ElasticMLP(nn.Module):
    """A nested elastic MLP: width choice ``c`` uses the first ``ceil(f_c * d_ff)`` hidden units.

    ``forward(x, plan)`` runs each token at the width its plan chose, scaled by the plan's weight
    (1 forward; the straight-through gradient reaches the router); ``forward(x, width=c)`` runs
    every token at choice ``c``. Dense reference: every unit is computed and the unused ones masked.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        width_choices: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        activation: Literal["gelu", "relu", "swiglu"] = "gelu",
    ):
        super().__init__()
        if activation not in ("gelu", "relu", "swiglu"):
            raise ValueError(f"activation must be 'gelu', 'relu' or 'swiglu', got {activation!r}")
        self.d_model, self.d_ff, self.activation = d_model, d_ff, activation
        self.width_choices = tuple(float(f) for f in width_choices)
        FlextronConfig(width_choices=self.width_choices).validate(len(self.width_choices))
        self.register_buffer("units", torch.tensor(width_units(self.width_choices, d_ff)), persistent=False)
        self.up = nn.Linear(d_model, d_ff * (2 if activation == "swiglu" else 1))
        self.down = nn.Linear(d_ff, d_model)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.activation == "swiglu":
            a, b = h.chunk(2, dim=-1)
            return nn.functional.silu(a) * b
        return nn.functional.gelu(h) if self.activation == "gelu" else nn.functional.relu(h)

    def forward(
        self, x: torch.Tensor, plan: RoutingPlan | None = None, *, width: int | None = None
    ) -> torch.Tensor:
        if (plan is None) == (width is None):
            raise TypeError("ElasticMLP: pass exactly one of plan= or width=")
        lead = x.shape[:-1]
        x_TD = x.reshape(-1, self.d_model)
        if plan is not None:
            if plan.num_tokens != x_TD.shape[0] or plan.num_experts != len(self.width_choices):
                raise ValueError(
                    f"ElasticMLP: plan routes {plan.num_tokens} tokens over {plan.num_experts} widths, "
                    f"x has {x_TD.shape[0]} tokens and the MLP {len(self.width_choices)} width choices"
                )
            n_T = self.units[plan.expert_ids_TK[:, 0].clamp_min(0)]
            scale_T1 = (plan.weights_TK[:, :1] * plan.keep_TK[:, :1]).to(x.dtype)
        else:
            if not 0 <= width < len(self.width_choices):
                raise ValueError(
                    f"width must index width_choices (0..{len(self.width_choices) - 1}), got {width}"
                )
            n_T = self.units[width].expand(x_TD.shape[0])
            scale_T1 = None
        mask_TF = torch.arange(self.d_ff, device=x.device) < n_T[:, None]
        h_TF = self.hidden(x_TD) * mask_TF.to(x.dtype)
        y_TD = nn.functional.linear(h_TF, self.down.weight) + self.down.bias
        if scale_T1 is not None:
            y_TD = y_TD * scale_T1
        return y_TD.view(*lead, self.d_model)

    @torch.no_grad()
    def rank_units_(self, x_calib: torch.Tensor) -> torch.Tensor:
        """Reorder the hidden units by importance (mean |activation| on ``x_calib``), most important first.

        The full-width function is unchanged (a permutation of the hidden units); returns the order.
        """
        h = self.hidden(x_calib.reshape(-1, self.d_model))
        order = h.abs().mean(0).argsort(descending=True, stable=True)
        F = self.d_ff
        rows = torch.cat([order, order + F]) if self.activation == "swiglu" else order
        self.up.weight.copy_(self.up.weight[rows])
        self.up.bias.copy_(self.up.bias[rows])
        self.down.weight.copy_(self.down.weight[:, order])
        return order


class FlextronSurrogate(nn.Module):
    """Predicts the language-modelling loss from the routers' logits alone (Fig. 3's surrogate model).

    Input: one logit tensor per routed layer (``[T, C]`` or ``[C]``); each is reduced to its mean
    routing distribution and the ``L * C`` values go through an MLP to one scalar.
    """

    def __init__(self, num_layers: int, num_choices: int, hidden: int = 256):
        super().__init__()
        self.num_layers, self.num_choices = num_layers, num_choices
        self.net = nn.Sequential(
            nn.Linear(num_layers * num_choices, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 1),
        )  # fmt: skip

    def features(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(logits) != self.num_layers:
            raise ValueError(
                f"FlextronSurrogate: expected {self.num_layers} layers' logits, got {len(logits)}"
            )
        parts = []
        for i, z in enumerate(logits):
            if z.shape[-1] != self.num_choices:
                raise ValueError(f"layer {i}: expected {self.num_choices} width logits, got {z.shape[-1]}")
            parts.append(torch.softmax(z.float(), dim=-1).reshape(-1, self.num_choices).mean(0))
        return torch.cat(parts)

    def forward(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Predicted LM loss (a 0-d tensor), differentiable in the logits."""
        return self.net(self.features(logits)).squeeze(-1)

    def fit_step(
        self, logits: Sequence[torch.Tensor], measured_loss: torch.Tensor | float, optimizer
    ) -> torch.Tensor:
        """One squared-error step towards the measured loss; the logits are treated as constants."""
        target = torch.as_tensor(measured_loss, dtype=torch.float32).detach()
        err = (self([z.detach() for z in logits]) - target) ** 2
        optimizer.zero_grad(set_to_none=True)
        err.backward()
        optimizer.step()
        return err.detach()

    @staticmethod
    def ready(recent_errors: Sequence[float], threshold: float) -> bool:
        """Router training may start once the mean recent squared error is below ``threshold``."""
        return bool(recent_errors) and sum(recent_errors) / len(recent_errors) < threshold


def latency_loss(plans: Sequence[RoutingPlan], table_LC: torch.Tensor, budget: float) -> torch.Tensor:
    r"""The latency loss $\big(\sum_l \bar p^{(l)} \cdot \text{LUT}_l / \sum_l \text{LUT}_{l,C} - b\big)^2$.

    ``plans`` holds one routing plan per layer, ``table_LC`` each layer's latency at each width
    (the last column is the full width), ``budget`` the requested fraction of the full latency.
    ``p`` is the mean over a layer's routed tokens of the router's softmax (its ``scores_TE``).
    """
    table = torch.as_tensor(table_LC, dtype=torch.float32)
    if table.dim() != 2 or table.shape[0] != len(plans):
        raise ValueError(f"table_LC must be [layers={len(plans)}, choices], got {tuple(table.shape)}")
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget}")
    expected = table.new_zeros(())
    for l, plan in enumerate(plans):
        if plan.num_experts != table.shape[1]:
            raise ValueError(f"layer {l}: plan has {plan.num_experts} widths, the table {table.shape[1]}")
        p = plan.scores_TE
        if plan.token_mask_T is not None:
            m = plan.token_mask_T.to(p.dtype)[:, None]
            p_C = (p * m).sum(0) / m.sum().clamp_min(1)
        else:
            p_C = p.mean(0) if p.shape[0] else torch.zeros_like(table[l])
        expected = expected + (p_C * table[l].to(p.device)).sum()
    full = table[:, -1].sum()
    return (expected / full.to(expected.device) - budget) ** 2
