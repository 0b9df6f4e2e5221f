r"""DynMoE's top-any gating: trainable per-expert thresholds and a pool of experts that grows and shrinks.

Guo et al. (2024) let every token use *any* number of experts and let training decide how many
experts a layer has. Each expert $e$ has a gate vector $w_e$ and a trainable threshold $G_e$; a
token activates every expert whose sigmoid-squashed cosine similarity exceeds the sigmoid of the
threshold:

$$
s_e(x) = \sigma\big(\cos(x, w_e)\big), \qquad
g_e(x) = \operatorname{sign}\big(\operatorname{ReLU}(s_e(x) - \sigma(G_e))\big) \in \{0, 1\},
\qquad k(x) = \sum_e g_e(x),
$$

and the selected experts are averaged with equal weights, $y = \frac{1}{k(x)} \sum_{e : g_e = 1}
\mathrm{FFN}_e(x)$. The sign is trained with a straight-through estimator (its backward is the
identity), so the ReLU still lets gradient reach $w_e$, $G_e$ and $x$ only through the active
(token, expert) pairs. In training a token may activate no expert (its MoE output is zero and it
is *recorded*); in evaluation it goes to its best expert $\arg\max_e s_e$ with weight 1.

Auxiliary losses (returned unweighted): the *diverse* loss $\lVert (\hat W^\top \hat W - I) \odot
m m^\top\rVert_F$ on the column-normalized gate vectors of the active experts $m$, the *simple*
loss $\frac{1}{E}\sum_e \lVert w_e \rVert_2$, a load-balance loss
$E^2 \operatorname{mean}_e(\bar p_e \bar g_e)$ over tokens with at least one expert
($\bar p_e$ the mean of $g_e / k$, $\bar g_e$ the mean of $g_e$), and an efficiency loss, the mean
activation rate $\operatorname{mean}_{t,e}\, g_e$.

**Adding and removing experts** (the paper's adaptive procedure, here the documented hook
`router.adapt_experts()`): while recording, the router counts the tokens routed to every expert
and sums the inputs of the tokens that activated none. `adapt_experts()` then (1) removes every
active expert that received no token, (2) if any token was left unrouted, activates the first
inactive expert slot with gate vector $\sum x / \lVert \sum x \rVert$ over those tokens and
threshold 0, and (3) clears the records. The pool never exceeds the `num_experts` slots the
layer was built with; `initial_experts` of them start active (`router.active_experts`). With
`adapt_every` set, `on_optimizer_step()` follows the official schedule: it starts recording
after `adapt_every` optimizer steps and adapts `adapt_every` steps later, in a cycle of three
times `adapt_every` (300 / 900 forward passes in the official code).

## Defaults and what is confirmed

From the official code (DeepSpeed implementation, the one its README recommends): gate vectors
initialized orthogonally, thresholds at 0, cosine scale fixed at 1, each loss added with weight
0.01, half of the expert slots initially active (MoE-LLaVA: 2 of 4). The paper's own method text
was not read, so equation numbers are not given.

**Deviations.** The expert add/remove schedule counts optimizer steps (`on_optimizer_step`), not
forward passes, and is off unless `adapt_every` is set; the new expert keeps whatever weights
its slot holds (as in the official code, where the slots are copies of one dense FFN). Removed
experts keep their parameters and can be re-added.

## Usage

```python
import torch, impls

router = impls.build_router("top_any", d_model=32, num_experts=8)   # 4 of 8 experts active
plan = router(torch.randn(64, 32))
print((plan.expert_ids_TK >= 0).sum(-1))    # 0..4 experts per token
router.adapt_experts()                      # remove idle experts, add one for unrouted tokens
print(router.active_experts)
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

__all__ = ["TopAnyConfig", "TopAnyRouter", "straight_through_sign"]


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def straight_through_sign(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` forward, identity backward (DynMoE's straight-through estimator)."""
    return _SignSTE.apply(x)


@dataclass(frozen=True, kw_only=True)
class TopAnyConfig(RouterConfig):
    """Options of ``TopAnyRouter``.

    Attributes:
        initial_experts: experts active at the start (``None`` = half of the slots, at least 1).
        scale: the cosine's scale inside the sigmoids (fixed at 1 in the official code).
        record: record routed and unrouted tokens from the start (``adapt_experts`` reads them).
        adapt_every: with a value ``n``, ``on_optimizer_step()`` records from step ``n`` to ``2n`` of
            every ``3n`` and then calls ``adapt_experts()``; ``None`` = only explicit calls.
        k: unused by the selection; sets the capacity formula only.
    """

    initial_experts: int | None = None
    scale: float = 1.0
    record: bool = False
    adapt_every: int | None = None

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.initial_experts is not None and not 1 <= self.initial_experts <= num_experts:
            raise ValueError(
                f"initial_experts must be in [1, num_experts={num_experts}] or None, "
                f"got {self.initial_experts}"
            )
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.adapt_every is not None and (not isinstance(self.adapt_every, int) or self.adapt_every < 1):
            raise ValueError(f"adapt_every must be an int >= 1 or None, got {self.adapt_every!r}")
        if self.has_capacity:
            raise ValueError("top-any gating is dropless; capacity_factor is not supported")


@register_router
class TopAnyRouter(Router):
    """DynMoE top-any gating: cosine scores against trainable thresholds; adaptive expert pool.

    Guo et al., "Dynamic Mixture of Experts: An Auto-Tuning Approach for Efficient Transformer
    Models", 2024, arXiv 2405.14297 (top-any gating, auxiliary losses, adaptive training process;
    equation numbers not checked).
    """

    name = "top_any"
    papers = ("dynmoe",)
    causal = True
    Config = TopAnyConfig
    config: TopAnyConfig
    fp32_buffers = ("routed_tokens", "unrouted_sum", "recording", "optimizer_steps")

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        cfg = self.config
        self.gate = None
        w = torch.empty(num_experts, d_model, dtype=torch.float32)
        nn.init.orthogonal_(w)
        self.gate_vectors = nn.Parameter(w)  # w_e as rows
        self.thresholds = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32))
        n0 = cfg.initial_experts or max(1, num_experts // 2)
        self.register_buffer("expert_mask", torch.arange(num_experts) < n0)
        self.register_buffer("routed_tokens", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("unrouted_sum", torch.zeros(d_model, dtype=torch.float32))
        self.register_buffer("recording", torch.tensor(float(cfg.record)))
        self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.float32))

    @property
    def active_experts(self) -> list[int]:
        """Indices of the experts in the pool (one host read)."""
        return self.expert_mask.nonzero().flatten().tolist()

    @property
    def max_experts_per_token(self) -> int:
        return self.num_experts

    @property
    def combine_normalization(self) -> float | None:
        # equal weights 1/k; in training a token may select no expert and have none
        return None if self.training else 1.0

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``cos(x, w_e) * scale`` for every slot (inactive slots included)."""
        xn = nn.functional.normalize(x_TD, dim=-1, eps=1e-12)
        wn = nn.functional.normalize(self.gate_vectors.float(), dim=-1, eps=1e-12)
        return (xn @ wn.T) * self.config.scale

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        E = self.num_experts
        mask_E = self.expert_mask
        s_TE = torch.sigmoid(logits_TE) * mask_E
        bar_E = torch.sigmoid(self.thresholds.float() * self.config.scale)
        g_TE = straight_through_sign(torch.relu(s_TE - bar_E))  # {0, 1}, STE backward
        if token_mask_T is not None:
            g_TE = g_TE * token_mask_T[:, None]
        k_T = g_TE.detach().sum(-1)
        routed_T = k_T > 0
        if not self.training:  # a token that selected nothing goes to its best active expert
            best_T = s_TE.detach().masked_fill(~mask_E, float("-inf")).argmax(-1)
            one_hot_TE = nn.functional.one_hot(best_T, E).to(g_TE.dtype)
            fill_T = ~routed_T if token_mask_T is None else ~routed_T & token_mask_T
            g_TE = torch.where(fill_T[:, None], one_hot_TE, g_TE)
            k_T = g_TE.detach().sum(-1)
        w_TE = g_TE / k_T.clamp_min(1)[:, None]
        active_TE = g_TE.detach() > 0
        T = logits_TE.shape[0]
        ids_TK = torch.where(active_TE, torch.arange(E, device=logits_TE.device).expand(T, E), -1)
        if self.training and torch.is_grad_enabled() and not recomputing_in_backward():
            self._record(active_TE, routed_T, x_TD, token_mask_T)
        # the gate-vector losses count once per batch with at least one valid token (an empty batch
        # has zero losses, like every router's)
        present = 1.0 if token_mask_T is None else token_mask_T.any().to(logits_TE.dtype)
        gate_losses = {n: v * present for n, v in self._gate_losses().items()}
        losses = {**gate_losses, **self._usage_losses(g_TE, k_T, token_mask_T)}
        return RoutingPlan(ids_TK, w_TE, active_TE, s_TE, logits_TE, losses, token_mask_T)

    def _gate_losses(self) -> dict[str, torch.Tensor]:
        w_ED = self.gate_vectors.float()
        wn_ED = nn.functional.normalize(w_ED, dim=-1, eps=1e-12)
        m_E = self.expert_mask.float()
        pair_EE = m_E[:, None] * m_E[None, :]
        gram_EE = (wn_ED @ wn_ED.T - torch.eye(self.num_experts, device=w_ED.device)) * pair_EE
        return {"diverse": gram_EE.norm(), "simple": w_ED.norm(dim=-1).mean()}

    def _usage_losses(self, g_TE, k_T, token_mask_T) -> dict[str, torch.Tensor]:
        E = self.num_experts
        valid_T = k_T > 0
        if token_mask_T is not None:
            valid_T = valid_T & token_mask_T
        me_E = masked_mean(g_TE / k_T.clamp_min(1)[:, None], valid_T)
        ce_E = masked_mean(g_TE, valid_T)
        return {
            "load_balance": E * E * (me_E * ce_E).mean(),
            "efficiency": masked_mean(g_TE.mean(-1), token_mask_T),
        }

    @torch.no_grad()
    def _record(self, active_TE, routed_T, x_TD, token_mask_T) -> None:
        on = self.recording
        self.routed_tokens += on * active_TE.float().sum(0)
        unrouted_T = ~routed_T if token_mask_T is None else ~routed_T & token_mask_T
        self.unrouted_sum += on * (x_TD * unrouted_T[:, None]).sum(0)

    @torch.no_grad()
    def start_recording(self) -> None:
        """Clear the records and start counting routed and unrouted tokens."""
        self.routed_tokens.zero_()
        self.unrouted_sum.zero_()
        self.recording.fill_(1.0)

    @torch.no_grad()
    def adapt_experts(self, process_group=None) -> None:
        """Remove experts that got no token, add one for the unrouted tokens; clear the records.

        With ``process_group`` the records are summed over its ranks first (the official code
        all-reduces them over the expert-parallel group), so every rank takes the same decision.
        """
        routed, unrouted = self.routed_tokens.clone(), self.unrouted_sum.clone()
        all_reduce_sum(routed, process_group)
        all_reduce_sum(unrouted, process_group)
        mask = self.expert_mask & (routed > 0)
        norm = unrouted.norm()
        free = ~mask
        if bool(norm > 0) and bool(free.any()):
            slot = int(free.nonzero()[0, 0])
            mask[slot] = True
            self.gate_vectors[slot] = (unrouted / norm).to(self.gate_vectors.dtype)
            self.thresholds[slot] = 0.0
        if not bool(mask.any()):  # keep at least one expert
            mask[int(routed.argmax())] = True
        self.expert_mask.copy_(mask)
        self.routed_tokens.zero_()
        self.unrouted_sum.zero_()
        self.recording.fill_(0.0)

    def on_optimizer_step(self, process_group=None) -> None:
        """With ``adapt_every = n``: start recording at step ``n`` and adapt at ``2n`` of every ``3n``."""
        n = self.config.adapt_every
        if n is None:
            return
        self.optimizer_steps += 1
        phase = int(self.optimizer_steps) % (3 * n)  # one host read per optimizer step
        if phase == n:
            self.start_recording()
        elif phase == 2 * n:
            self.adapt_experts(process_group)


DYNMOE = register_preset(
    Preset(
        name="dynmoe",
        router="top_any",
        options={},
        num_experts=4,
        loss_coefficients={"diverse": 0.01, "simple": 0.01, "load_balance": 0.01, "efficiency": 0.01},
        papers=("dynmoe",),
        description=(
            "DynMoE (Guo et al. 2024, arXiv 2405.14297), MoE-LLaVA setting: 4 expert slots, 2 active at "
            "the start, top-any gating, each auxiliary loss weighted 0.01."
        ),
        deviations=(
            "Values from the official code (MoE-LLaVA scripts); the paper's text was not read. The "
            "add/remove schedule runs only with adapt_every set or by explicit adapt_experts() calls."
        ),
    )
)
