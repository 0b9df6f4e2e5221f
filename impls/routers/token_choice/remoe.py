r"""ReMoE: ReLU gates whose sparsity an adaptive L1 penalty steers to a target (Wang et al., ICLR 2025).

TopK routing is discontinuous: an expert's weight jumps to zero when it leaves the top $k$.
ReMoE replaces TopK and softmax by a ReLU (Eq. 5),

$$
R(x_t) = \operatorname{ReLU}(x_t W), \qquad y_t = \sum_e R(x_t)_e \, \mathrm{FFN}_e(x_t),
$$

so the gate is continuous, an expert switches off where its value is zero, and a token uses a
*varying* number of experts. The ReLU outputs are the combine weights (no normalization).

Sparsity comes from an L1 penalty, weighted by each expert's load so that it also balances
(Eq. 10-11, the form used in all the paper's experiments):

$$
\mathcal{L}_\text{reg} = \frac{1}{T} \sum_t \sum_e f_e \, R(x_t)_e, \qquad
f_e = \frac{E}{k T} \sum_t \mathbb{1}\{R(x_t)_e > 0\} \quad (\text{no gradient through } f),
$$

and its coefficient is not a fixed hyperparameter but adapted once per training step towards the
target sparsity $1 - k/E$, i.e. an average of $k$ active experts per token (Eq. 7-8):

$$
\lambda_{i+1} = \lambda_i \, \alpha^{\operatorname{sign}\left((1 - k/E) - S_i\right)}, \qquad
S_i = 1 - \frac{1}{T E} \sum_t \sum_e \mathbb{1}\{R(x_t)_e > 0\}.
$$

With $\lambda_0 = 10^{-8}$ and $\alpha = 1.2$ training passes through three stages (Sec. 3.5):
nearly dense warm-up, sparsifying (the penalty grows until the sparsity reaches the target,
about 100 steps) and stable.

The plan returns `l1` ($\mathcal{L}_\text{reg}$, unweighted) and `l1_adaptive`
($\lambda_i \mathcal{L}_\text{reg}$, the term ReMoE adds to the task loss, with coefficient 1).
The router counts the active (token, expert) pairs of every training forward;
**`router.on_optimizer_step()`** (or `impls.step_routers(model)`) turns the counts since the last
call into $S_i$ and updates $\lambda$ (a float32 buffer saved in the state dict). Under gradient
accumulation call it once per optimizer step; with data parallelism pass the process group, so
that the counts are summed over the ranks and every rank applies the same update (the official
code averages the sparsity over data-parallel ranks). The plan has $E$ slots, unused ones `-1`.

## Defaults and what is confirmed

Confirmed (Sec. 3.3, 4.1): $\lambda_0 = 10^{-8}$, $\alpha = 1.2$, target $1 - k/E$, the
load-weighted L1 of Eq. 10-11, no normalization of the ReLU outputs, no router bias; main
setting $E = 8$, $k = 1$. The router weight is initialized $\mathcal{N}(0, 0.01^2)$ as in the
official scripts (`--init-method-std 0.01`).

**Deviations.** When $S_i$ equals the target exactly, Eq. 7 keeps $\lambda$ ($\operatorname{sign}
0 = 0$); the official code divides by $\alpha$. This module follows the paper. The official code
sums the penalty over layers instead of averaging (Eq. 10's $1/L$); since $\lambda$ adapts, only
the equilibrium value of $\lambda$ differs. Here each layer's router adapts its own $\lambda$ to
its own sparsity, while the paper uses one $\lambda$ and the sparsity averaged over all layers.

## Usage

```python
import torch, impls

layer = impls.MoELayer(64, 128, router="remoe_k1", num_experts=8)
opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
for _ in range(3):
    out, plan = layer(torch.randn(4, 16, 64))
    loss = out.pow(2).mean() + plan.aux_loss(layer.loss_coefficients)   # adds lambda * L_reg
    opt.zero_grad(); loss.backward(); opt.step()
    impls.step_routers(layer)                       # lambda *= 1.2 or /= 1.2
print(plan.experts_per_token, layer.router.l1_coefficient)
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from impls.functional import masked_mean
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig, all_reduce_sum, recomputing_in_backward

__all__ = ["ReMoEConfig", "ReMoERouter"]


@dataclass(frozen=True, kw_only=True)
class ReMoEConfig(RouterConfig):
    """Options of ``ReMoERouter``.

    Attributes:
        k: the target average number of active experts per token (target sparsity ``1 - k/E``).
        l1_init: ``lambda_0``, the initial L1 coefficient.
        l1_step: ``alpha > 1``, the factor ``lambda`` is multiplied or divided by per step.
        load_weighted: use the load-balancing L1 of Eq. 10-11 (the paper's choice) instead of the
            plain L1 of Eq. 9.
        init_std: standard deviation of the router weight's normal initialization.
    """

    k: int = 1
    l1_init: float = 1e-8
    l1_step: float = 1.2
    load_weighted: bool = True
    init_std: float = 0.01

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if not self.l1_init > 0:
            raise ValueError(f"l1_init must be > 0, got {self.l1_init}")
        if not self.l1_step > 1:
            raise ValueError(f"l1_step must be > 1, got {self.l1_step}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        if self.has_capacity:
            raise ValueError(
                "ReMoE routes dropless (a token's expert count varies); capacity_factor is not supported"
            )

    def target_sparsity(self, num_experts: int) -> float:
        return 1.0 - self.k / num_experts


@register_router
class ReMoERouter(Router):
    """ReLU router with an adaptive, load-weighted L1 penalty (variable experts per token).

    Wang, Zhu, Chen, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing",
    ICLR 2025, arXiv 2412.14711: Sec. 3.2 (ReLU router, Eq. 5), Sec. 3.3 (adaptive L1, Eq. 6-9),
    Sec. 3.4 (load-balancing refinement, Eq. 10-11), Sec. 3.5 (three training stages).
    """

    name = "remoe"
    papers = ("remoe",)
    causal = True
    Config = ReMoEConfig
    config: ReMoEConfig
    fp32_buffers = ("l1_coefficient", "active_pairs", "routed_pairs")

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        nn.init.normal_(self.gate.weight, std=self.config.init_std)
        self.register_buffer("l1_coefficient", torch.tensor(self.config.l1_init, dtype=torch.float32))
        self.register_buffer("active_pairs", torch.zeros((), dtype=torch.float32), persistent=False)
        self.register_buffer("routed_pairs", torch.zeros((), dtype=torch.float32), persistent=False)

    @property
    def max_experts_per_token(self) -> int:
        return self.num_experts

    @property
    def combine_normalization(self) -> None:
        return None  # raw ReLU values

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        cfg, E = self.config, self.num_experts
        gates_TE = torch.relu(logits_TE)
        active_TE = gates_TE > 0
        if token_mask_T is not None:
            active_TE = active_TE & token_mask_T[:, None]
        T = logits_TE.shape[0]
        ids_TK = torch.where(active_TE, torch.arange(E, device=logits_TE.device).expand(T, E), -1)
        w_TK = torch.where(active_TE, gates_TE, torch.zeros_like(gates_TE))
        if cfg.load_weighted:
            f_E = masked_mean(active_TE.float(), token_mask_T) * (E / cfg.k)  # (E / kT) * count, no grad
            per_token_T = (gates_TE * f_E).sum(-1)
        else:
            per_token_T = gates_TE.sum(-1)
        l1 = masked_mean(per_token_T, token_mask_T)
        if self.training and torch.is_grad_enabled() and not recomputing_in_backward():
            with torch.no_grad():
                n_valid = T if token_mask_T is None else token_mask_T.sum()
                self.active_pairs += active_TE.sum()
                self.routed_pairs += n_valid * E
        losses = {"l1": l1, "l1_adaptive": self.l1_coefficient * l1}
        sparsity = 1.0 - masked_mean(active_TE.float().mean(-1), token_mask_T)
        return RoutingPlan(
            ids_TK, w_TK, active_TE, gates_TE, logits_TE, losses, token_mask_T, info={"sparsity": sparsity}
        )

    @torch.no_grad()
    def on_optimizer_step(self, process_group=None) -> None:
        """Eq. 7: ``lambda *= alpha ** sign(target - S)`` from the pairs counted since the last call."""
        counts = torch.stack([self.active_pairs, self.routed_pairs])
        all_reduce_sum(counts, process_group)
        active, routed = counts
        sparsity = 1.0 - active / routed.clamp_min(1)
        target = self.config.target_sparsity(self.num_experts)
        direction = torch.sign(target - sparsity) * (routed > 0)  # nothing counted: no change, no sync
        self.l1_coefficient *= self.config.l1_step**direction
        self.active_pairs.zero_()
        self.routed_pairs.zero_()


REMOE_K1 = register_preset(
    Preset(
        name="remoe_k1",
        router="remoe",
        options={"k": 1, "l1_init": 1e-8, "l1_step": 1.2},
        num_experts=8,
        loss_coefficients={"l1_adaptive": 1.0},
        papers=("remoe",),
        description=(
            "ReMoE (Wang et al., ICLR 2025, arXiv 2412.14711): 8 experts, ReLU gates, target of 1 active "
            "expert per token on average, lambda_0 = 1e-8, alpha = 1.2, load-weighted L1."
        ),
        deviations=(
            "lambda adapts per layer to that layer's sparsity (the paper: one lambda, sparsity averaged "
            "over layers)."
        ),
    )
)
