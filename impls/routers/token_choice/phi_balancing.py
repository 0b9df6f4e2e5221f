r"""ϕ-Balancing (Chen et al., ICML 2026): balance the *population* routing distribution through EMA prices.

A balance loss on each mini-batch's mean routing probability is a biased estimate of what one
wants, a balanced *expected* distribution $\bar p(\theta) = \mathbb{E}_x[p(x; \theta)]$ (Jensen's
inequality). ϕ-Balancing minimizes a strictly convex, symmetric potential $\phi$ of the expected
distribution, $\min_\theta \mathcal{L}_\text{task} + \alpha\, \phi(\bar p(\theta))$, whose unique
minimizer on the simplex is uniform. Writing $\phi$ through its convex conjugate,
$\phi(\bar p) = \max_q \langle \bar p, q \rangle - \phi^*(q)$, turns this into a min-max problem
with per-expert *prices* $q$; one mirror-ascent step on $q$ with $\phi^*$ as the mirror map is an
exponential moving average of the batch means, so per step $t$ and layer

$$
p_t = \frac{1}{T}\sum_{x \in B_t} \operatorname{softmax}(W_r x), \qquad
m_{t+1} = (1 - \eta)\, m_t + \eta\, \operatorname{sg}(p_t), \qquad
q_{t+1} = \nabla\phi(m_{t+1}), \qquad
\mathcal{L}_\phi = \sum_e \operatorname{sg}(q_{t+1,e})\, p_{t,e}.
$$

This is the Switch loss with the hard dispatch fraction $f_e$ replaced by the price
$\nabla\phi(m)_e$: the gradient flows through $p$ only. With the recommended negative entropy
$\phi(m) = \sum_e m_e \log m_e$, $\nabla\phi(m) = \log m + 1$: an expert that has been
over-used (large $m_e$) has a high price and its probability is pushed down. The ℓ2 potential
$\phi(m) = \tfrac12 \lVert m \rVert^2$ gives $\nabla\phi(m) = m$. Routing itself is the unchanged
softmax top-$k$ (`impls.routers.token_choice.topk`).

The EMA $m$ is a float32 buffer per layer (in the state dict), started uniform and updated on
every training forward from that batch's mean probabilities; evaluation leaves it alone. Under
gradient accumulation every micro-batch is one EMA step; under data parallelism each rank keeps
its own EMA unless the batches are the same (all-reduce $m$ with `sync_prices(group)` after the
optimizer step to keep the ranks identical).

## Defaults and what is confirmed

The paper's body could not be read for this implementation: the mechanism follows its abstract
(convex potential of the expected routing distribution, convex duality, mirror descent giving an
EMA-based adjustment) and consistent secondary summaries of Algorithm 1. Negative entropy is
their recommended potential; $\eta \in [0.6, 0.7]$ is reported best (default 0.65, as the weight
of the *new* batch in the EMA as printed; the summaries leave open which side $\eta$ weights).
No loss weight $\alpha$ is published.

**Deviations.** No extra factor $E$ on the loss (whether the paper has one is not known).
$m$ is clamped at $10^{-12}$ before the logarithm.

## Usage

```python
import torch, impls

layer = impls.MoELayer(64, 128, router="phi_balancing", num_experts=16, k=2)
out, plan = layer(torch.randn(4, 16, 64))
loss = out.pow(2).mean() + 0.01 * plan.losses["phi_balance"]
print(layer.router.ema_probs)            # the EMA m of the routing distribution
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from impls.functional import masked_mean
from impls.plan import RoutingPlan
from impls.registry import register_router
from impls.router import RouterConfig, recomputing_in_backward
from impls.routers.token_choice.topk import TopKConfig, TopKRouter

__all__ = ["PhiBalancingConfig", "PhiBalancingRouter", "phi_prices"]


def phi_prices(m_E: torch.Tensor, potential: str) -> torch.Tensor:
    """``grad phi(m)``: ``log m + 1`` (negative entropy) or ``m`` (the l2 potential)."""
    if potential == "neg_entropy":
        return torch.log(m_E.clamp_min(1e-12)) + 1.0
    return m_E


@dataclass(frozen=True, kw_only=True)
class PhiBalancingConfig(TopKConfig):
    """Options of ``PhiBalancingRouter``: the top-k router's, plus the potential and the EMA rate.

    Attributes:
        potential: ``"neg_entropy"`` (recommended) or ``"l2"``.
        eta: the EMA weight of the new batch, ``m <- (1 - eta) m + eta p``.
    """

    potential: Literal["neg_entropy", "l2"] = "neg_entropy"
    eta: float = 0.65

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.potential not in ("neg_entropy", "l2"):
            raise ValueError(f"potential must be 'neg_entropy' or 'l2', got {self.potential!r}")
        if not 0 < self.eta <= 1:
            raise ValueError(f"eta must be in (0, 1], got {self.eta}")


@register_router
class PhiBalancingRouter(TopKRouter):
    """Softmax top-k routing balanced by ϕ-Balancing's EMA-price loss ``sum_e sg(grad phi(m))_e p_e``.

    Chen, Li, Wang, Liao, Li, Liang, Lao, Liu, "ϕ-Balancing for Mixture-of-Experts Training",
    ICML 2026, arXiv 2605.15403 (Algorithm 1; equation numbers not checked).
    """

    name = "phi_balancing"
    papers = ("phi-balancing",)
    Config = PhiBalancingConfig
    config: PhiBalancingConfig
    fp32_buffers = ("ema_probs",)

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        self.register_buffer("ema_probs", torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float32))

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        plan = super().route(logits_TE, x_TD, token_mask_T)
        cfg = self.config
        p_E = masked_mean(plan.scores_TE, token_mask_T)
        T = logits_TE.shape[0]
        n_valid = (
            torch.tensor(float(T), device=logits_TE.device) if token_mask_T is None else token_mask_T.sum()
        )
        present = (n_valid > 0).to(p_E.dtype)  # no host sync: an empty batch leaves m and the loss at 0
        m_E = self.ema_probs
        if self.training and not recomputing_in_backward():
            with torch.no_grad():
                step = cfg.eta * present
                m_E = (1 - step) * self.ema_probs + step * p_E.detach()
                self.ema_probs.copy_(m_E)
        q_E = phi_prices(m_E, cfg.potential).detach()
        # the price loss replaces the Switch loss (kept: the router z-loss)
        losses = {"z_loss": plan.losses["z_loss"], "phi_balance": (q_E * p_E).sum() * present}
        return dataclasses.replace(plan, losses=losses)

    @torch.no_grad()
    def sync_prices(self, process_group=None) -> None:
        """Average the EMA over the ranks of ``process_group`` (identical prices on every rank)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.ema_probs, group=process_group)
            self.ema_probs /= torch.distributed.get_world_size(process_group)
