r"""GShard top-2 gating: argmax first expert, stochastically kept second expert, capacity, GShard aux loss.

GShard (Lepikhin et al. 2020, Algorithm 1) computes float32 gates $g = \operatorname{softmax}(x W_g)$
over $E$ experts, takes the best expert $e_1 = \arg\max g$ and the best remaining one $e_2$, and
renormalizes the two gates

$$
\hat g_1 = \frac{g_{e_1}}{g_{e_1} + g_{e_2}}, \qquad \hat g_2 = \frac{g_{e_2}}{g_{e_1} + g_{e_2}}.
$$

The second expert is dispatched only with probability $\min(1, 2 \hat g_2)$ ("random routing":
when the second gate is small, skipping it saves capacity for first choices). Generally, with
`second_policy="random"` it is kept when $u < \hat g_2 / \tau$, $u \sim \mathcal{U}(0,1)$, and
$\tau = 0.5$ gives GShard's $2 \hat g_2$ (Mesh-TF's default is $\tau = 0.2$). The weights are not
renormalized again when the second expert is skipped. A skipped second choice is an empty slot
(`-1`): it takes no capacity and is not counted as a drop.

Capacity per expert is $C = \lceil \mathrm{CF} \cdot 2T / E \rceil$, i.e. $2T/E$ for
$\mathrm{CF} = 1$ (GShard's $2N/E$; fairseq rounds as $2 \lceil T/E \rceil$); all first choices
are placed before any second choice, in token order, and overflowing assignments are dropped.

Auxiliary loss (Algorithm 1, `l_aux`), from the decision before capacity and before the random
second-expert drop:

$$
\ell_\text{aux} = E \sum_{e=1}^{E} c_e \, m_e, \qquad
c_e = \frac{1}{T} \#\{t : e_1(t) = e\}, \qquad m_e = \frac{1}{T} \sum_t g_{t,e},
$$

counting **first choices only**; a perfectly balanced router gives $1$. (Algorithm 1 writes the
mean over experts, $\frac{1}{E}\sum_e c_e m_e$, whose balanced value is $1/E^2$; the $E^2$ scale
used here is the Mesh-TF / fairseq form.) It is returned as `load_balance`, with the router
z-loss as `z_loss` for convenience.

Sampling happens only in training. In `eval()` the second expert follows `eval_second_policy`
(default `"all"`: always dispatched, subject to capacity), so evaluation is deterministic; the
paper does not say what it does at evaluation, and Mesh-TF keeps sampling there (a known source
of non-determinism).

**NLLB-200** (NLLB Team 2022, arXiv 2207.04672) trains its 128-expert MoE layers with this gate
(fairseq's top-2: the second expert always dispatched, weights renormalized *after* capacity
dropping) and regularizes them for low-resource directions with **Expert Output Masking**
(EOM): in training every (token, expert) assignment's output vector is zeroed, whole, with
probability $p_\text{eom}$, independently for the first and second expert and without
rescaling; the token then keeps its residual plus whatever survived. In `eval()` every expert
output is scaled by $1 - p_\text{eom}$ instead (the released code). Since the layer combines
$y = \sum_j w_j E_{e_j}(x)$, masking an output equals zeroing its combine weight, which is how the
router applies it (`expert_output_masking`), after capacity. EOM differs from Gating Dropout
(Liu et al. 2022, which skips the all-to-all for a whole batch) and from NLLB's "Conditional
MoE Routing" (a learned dense/MoE mix), neither of which the released NLLB-200 recipe uses.

## Defaults and what is confirmed

`gshard_top2`: top-2, $\mathrm{CF} = 1$ (capacity $2T/E$), random second expert with $\tau = 0.5$,
all confirmed from the paper's Algorithm 1 and the fairseq / DeepSpeed implementations. The loss
weight 0.01 is the fairseq/DeepSpeed convention and not confirmed from the paper. GShard trains
with 128 to 2048 experts; the preset leaves $E$ to the caller (8 when omitted).

`nllb_200`: 128 experts, second policy `"all"`, capacity factor 1, renormalization after
dropping, $p_\text{eom} = 0.2$ and loss weight 0.01 — the released fairseq recipe (`nllb`
branch: `--moe-second-expert-policy all`, `--moe-eom 0.2`, `--moe-gate-loss-wt 0.01`) and the
released model config (`moe_token_dropout: 0.2`); the paper's text itself was not read here.
Evaluation capacity is the whole batch (`--moe-eval-capacity-token-fraction 1.0`).

## Usage

```python
import torch, impls

router = impls.build_router("gshard_top2", d_model=32, num_experts=4)
router.train()
plan = router(torch.randn(16, 32))
print(plan.capacity)                               # ceil(1.0 * 2 * 16 / 4) = 8
print((plan.expert_ids_TK[:, 1] >= 0).float().mean())  # share of tokens keeping a second expert
router.eval()
assert torch.equal(router(torch.ones(3, 32)).expert_ids_TK, router(torch.ones(3, 32)).expert_ids_TK)
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from impls.functional import load_balance_loss, topk, z_loss
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig

__all__ = ["GShardConfig", "GShardRouter"]

SecondPolicy = Literal["all", "random", "threshold", "none"]
_POLICIES = ("all", "random", "threshold", "none")


@dataclass(frozen=True, kw_only=True)
class GShardConfig(RouterConfig):
    """Options of ``GShardRouter``.

    Attributes:
        k: must be 2 (GShard is a top-2 gate).
        capacity_factor: 1.0 gives GShard's capacity ``2T/E``.
        second_policy: training-time rule for the second expert: ``"random"`` (keep when
            ``u < g2 / second_threshold``), ``"threshold"`` (keep when ``g2 > second_threshold``),
            ``"all"`` or ``"none"``.
        eval_second_policy: the rule in ``eval()``; ``"random"`` is not allowed there.
        second_threshold: ``tau`` above (0.5 = GShard's ``2 * g2``).
        renormalize_after_drop: renormalize the weights over the assignments that survived
            capacity (fairseq's ``normalize_gate_prob_before_dropping=False``, used by NLLB-200);
            a token left with one expert then gives it weight 1.
        expert_output_masking: NLLB's Expert Output Masking rate ``p_eom``: in training each
            (token, expert) output is zeroed with this probability, whole; in ``eval()`` every
            output is scaled by ``1 - p_eom`` instead. 0 disables it.
    """

    k: int = 2
    capacity_factor: float | None = 1.0
    second_policy: SecondPolicy = "random"
    eval_second_policy: SecondPolicy = "all"
    second_threshold: float = 0.5
    renormalize_after_drop: bool = False
    expert_output_masking: float = 0.0

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.k != 2:
            raise ValueError(f"GShard gating is top-2; got k={self.k}")
        if self.second_policy not in _POLICIES:
            raise ValueError(f"second_policy must be one of {_POLICIES}, got {self.second_policy!r}")
        if self.eval_second_policy not in ("all", "threshold", "none"):
            raise ValueError(
                f"eval_second_policy must be 'all', 'threshold' or 'none' (deterministic), "
                f"got {self.eval_second_policy!r}"
            )
        if not self.second_threshold > 0:
            raise ValueError(f"second_threshold must be > 0, got {self.second_threshold}")
        if not 0 <= self.expert_output_masking < 1:
            raise ValueError(f"expert_output_masking must be in [0, 1), got {self.expert_output_masking}")


@register_router
class GShardRouter(Router):
    """GShard top-2 gating with random second-expert dispatch.

    Lepikhin et al., "GShard: Scaling Giant Models with Conditional Computation and Automatic
    Sharding", 2020, arXiv 2006.16668, Algorithm 1 (top-2 gating, capacity, ``l_aux``). NLLB Team,
    "No Language Left Behind: Scaling Human-Centered Machine Translation", 2022, arXiv 2207.04672
    (Expert Output Masking).
    """

    name = "gshard"
    papers = ("gshard", "nllb")
    causal = True
    Config = GShardConfig

    @property
    def combine_normalization(self) -> str:
        # g1 + g2 = 1 when both are dispatched; less when the second expert is skipped
        return "at_most_one"

    def _second_mask(self, g2_T: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        policy = cfg.second_policy if self.training else cfg.eval_second_policy
        if policy == "all":
            return torch.ones_like(g2_T, dtype=torch.bool)
        if policy == "none":
            return torch.zeros_like(g2_T, dtype=torch.bool)
        if policy == "threshold":
            return g2_T > cfg.second_threshold
        return torch.rand_like(g2_T) < g2_T / cfg.second_threshold

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        probs_TE = torch.softmax(logits_TE, dim=-1)
        g_TK, ids_TK = topk(probs_TE, 2)
        losses = {
            # GShard's c_e counts first choices only
            "load_balance": load_balance_loss(probs_TE, ids_TK[:, :1], token_mask_T),
            "z_loss": z_loss(logits_TE, token_mask_T),
        }
        g_TK = g_TK / g_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        second_T = self._second_mask(g_TK[:, 1].detach())
        ids_TK = torch.stack([ids_TK[:, 0], torch.where(second_T, ids_TK[:, 1], -1)], dim=1)
        w_TK = torch.stack([g_TK[:, 0], torch.where(second_T, g_TK[:, 1], 0.0)], dim=1)
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        keep_TK = ids_TK >= 0
        return RoutingPlan(ids_TK, w_TK, keep_TK, probs_TE, logits_TE, losses, token_mask_T)

    def _apply_capacity(self, plan: RoutingPlan) -> RoutingPlan:
        plan = super()._apply_capacity(plan)
        cfg = self.config
        w_TK = plan.weights_TK
        if cfg.renormalize_after_drop:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        p = cfg.expert_output_masking
        if p > 0:
            # training: one Bernoulli draw per (token, expert) assignment, no rescaling
            keep = (torch.rand_like(w_TK) >= p).to(w_TK.dtype) if self.training else 1.0 - p
            w_TK = w_TK * keep
        if w_TK is plan.weights_TK:
            return plan
        return dataclasses.replace(plan, weights_TK=w_TK)


GSHARD_TOP2 = register_preset(
    Preset(
        name="gshard_top2",
        router="gshard",
        options={"k": 2, "capacity_factor": 1.0, "second_policy": "random", "second_threshold": 0.5},
        loss_coefficients={"load_balance": 1e-2},
        papers=("gshard",),
        description=(
            "GShard top-2 gating (Lepikhin et al. 2020, arXiv 2006.16668, Algorithm 1): capacity 2T/E, "
            "second expert dispatched with probability 2*g2."
        ),
        deviations=(
            "Evaluation always dispatches the second expert (the paper leaves evaluation open); "
            "loss weight 0.01 is the fairseq/DeepSpeed convention."
        ),
    )
)
NLLB_200 = register_preset(
    Preset(
        name="nllb_200",
        router="gshard",
        options={
            "k": 2,
            "capacity_factor": 1.0,
            "eval_capacity_factor": 64.0,
            "second_policy": "all",
            "renormalize_after_drop": True,
            "expert_output_masking": 0.2,
        },
        num_experts=128,
        loss_coefficients={"load_balance": 1e-2},
        papers=("nllb",),
        description=(
            "NLLB-200 MoE (NLLB Team 2022, arXiv 2207.04672): 128 experts, top-2 with the second expert "
            "always dispatched, capacity 2T/E in training, weights renormalized after dropping, Expert "
            "Output Masking p_eom = 0.2."
        ),
        deviations=(
            "Values from the released fairseq training recipe (nllb branch) and model config; the paper's "
            "text was not read here. Evaluation capacity is the whole batch (the recipe's "
            "eval-capacity-token-fraction 1.0, i.e. nothing dropped). MoE every 4th layer, and the "
            "fairseq capacity 2*ceil(T/E) rounding (here ceil(2T/E)), are not modelled."
        ),
    )
)
