r"""DeepSeekMoE routing: fine-grained and shared experts, group-limited top-k, sigmoid gates, loss-free bias.

**DeepSeekMoE** (Dai et al. 2024) splits each expert into $m$ smaller ones and keeps $K_s$
*shared* experts always on; the router scores only the routed experts,

$$
h_t = \sum_{i=1}^{K_s} \operatorname{FFN}^{(s)}_i(u_t)
    + \sum_{i=1}^{N_r} g_{i,t} \operatorname{FFN}^{(r)}_i(u_t), \qquad
g_{i,t} = \begin{cases} s_{i,t} & s_{i,t} \in \operatorname{TopK}(\{s_{j,t}\}, K_r) \\
    0 & \text{otherwise} \end{cases}, \qquad
s_{i,t} = \operatorname{softmax}_i(u_t^\top e_i).
$$

Shared experts live in the layer: `impls.MoELayer(..., num_shared_experts=...)` (set by the
presets).

**DeepSeek-V2** adds *device-limited routing*: experts are partitioned into $M$ groups (devices);
each token first keeps the `topk_group` groups with the highest score (the group's best expert,
`group_score="max"`) and then picks its top-$K_r$ experts inside them. Other groups are masked
with $-\infty$ — never with 0, which a negative score could lose to. V2 balances with three
sequence- or batch-level losses (V2 Sec. 2.2.3): expert-level
$\mathcal{L}_\text{ExpBal} = \sum_i f_i P_i$ with
$f_i = \frac{N_r}{K_r T} \sum_t \mathbb{1}(\text{token } t \text{ selects } i)$,
device-level $\mathcal{L}_\text{DevBal} = \sum_{d} f'_d P'_d$ ($f'_d$ the mean of $f_i$ over the
device's experts, $P'_d$ the sum of $P_i$) and communication $\mathcal{L}_\text{CommBal} = \sum_d f''_d P''_d$
($f''_d = \frac{D}{M T}\sum_t \mathbb{1}(\text{token } t \text{ sent to device } d)$). All three are
$1$ when balanced.

**DeepSeek-V3** uses sigmoid affinities, renormalizes the selected ones and scales them by
$\gamma_r$ (`routed_scaling_factor`, 2.5):

$$
s_{i,t} = \sigma(u_t^\top e_i), \qquad
g_{i,t} = \gamma_r \frac{s_{i,t}}{\sum_{j \in \mathcal{T}_t} s_{j,t}}, \qquad
\mathcal{T}_t = \operatorname{TopK}(\{s_{j,t} + b_j\}, K_r),
$$

with node-limited groups scored by the sum of their two best biased affinities
(`group_score="top2_sum"`) and a small *sequence-wise* balance loss (V3 Sec. 2.1.2) on the
normalized affinities $s'_{i,t} = s_{i,t} / \sum_j s_{j,t}$. Its $f_i$ (V3 eq. 18) counts
$\mathbb{1}(s_{i,t} \in \operatorname{Topk}(\{s_{j,t}\}, K_r))$: the plain top-$K_r$ of the
*unbiased* affinities, not the biased, group-limited selection (`balance_counts="unbiased_topk"`,
as in Megatron-Core); DeepSeekMoE and V2 count the experts actually selected (`"selected"`).

**Auxiliary-loss-free balancing** (Wang et al. 2024) is the bias $b_j$ above: it changes only
*which* experts are selected, never the combine weights (those use $s_{i,t}$ as computed, never
recovered as biased $-$ bias), and after each training step it moves toward balance,

$$
b_i \leftarrow b_i + u \cdot \operatorname{sign}(\bar c - c_i),
$$

$c_i$ being the tokens routed to expert $i$ since the last update and $\bar c$ their mean. The
bias is a float32 buffer that stays float32 under `module.to(torch.bfloat16)`. Each forward in
training (with autograd on) adds its counts; `eval()` and `torch.no_grad()` forwards do not count.
Under activation checkpointing the recomputation inside backward is not counted again
(PyTorch's default non-reentrant checkpointing); reentrant checkpointing runs the first forward
under `no_grad`, so set `router.count_during_recompute = True` there and the recomputation is
the one counted.
**Call `router.update_bias()` once per optimizer step** (after the last micro-batch of a
gradient-accumulation cycle): it applies the rule to the accumulated counts, all-reduced over a
process group when given, and resets them. `router.on_optimizer_step()` does the same, and
`impls.step_routers(model)` calls it on every router of a model.

Losses (unweighted): `load_balance` (batch-level $\mathcal{L}_\text{ExpBal}$), `seq_load_balance`
(the same averaged over sequences: needs `sequence_length`, or a `[batch, seq, D]` input; the
whole batch counts as one sequence otherwise), and with groups `device_balance` and
`comm_balance`; `z_loss` too.

## Presets and what is confirmed

| preset | routed / shared | k | score | groups | scale | loss weights |
|---|---|---|---|---|---|---|
| `deepseekmoe_2b` | 63 / 1 | 7 | softmax | — | 1 | seq 0.01 |
| `deepseekmoe_16b` | 64 / 2 | 6 | softmax | — | 1 | seq 0.001 |
| `deepseek_v2_lite` | 64 / 2 | 6 | softmax | — | 1 | seq 0.001 |
| `deepseek_v2` | 160 / 2 | 6 | softmax | 8, keep 3, max | 16 | seq 0.003, device 0.05, comm 0.02 |
| `deepseek_v3` | 256 / 1 | 8 | sigmoid, renorm. | 8, keep 4, top-2 sum | 2.5 | bias $u = 0.001$, seq 1e-4 |
| `aux_loss_free` | 64 / 2 | 6 | sigmoid, renorm. | — | 1 | bias $u = 0.001$ |

Expert counts, $k$, groups and scales of V2/V2-Lite/V3 are from the released configs
(confirmed); loss weights are the papers' as quoted by secondary sources. DeepSeekMoE's
$\alpha_1$ values are from the paper as quoted; that its loss is sequence-level follows the
released config (`seq_aux`). For `aux_loss_free` the backbone size is illustrative (the paper
trains 1B/3B DeepSeekMoE models); $u = 0.001$ and the sigmoid gate are the paper's.

**Deviations.** V2's device-level token dropping and V3's node-level all-to-all are not modelled
(everything runs on one device; groups only restrict selection). V3's update speed is 0.001 for
most of training and 0 at the end; the schedule is the caller's (set `router.bias_update_rate`).

## Usage

```python
import torch, impls

router = impls.build_router("deepseek_v3", d_model=32)           # 256 experts, 8 groups
router.train()
x = torch.randn(2, 16, 32)                                        # [batch, seq, D]
for step in range(3):
    plan = router(x)                                              # counts accumulate
    router.update_bias()                                          # once per optimizer step
print(router.expert_bias[:4], plan.weights_TK.sum(-1)[:2])       # weights sum to 2.5

layer = impls.MoELayer(32, 16, router="deepseekmoe_16b")          # 64 routed + 2 shared
out, plan = layer(torch.randn(2, 8, 32))
aux = plan.aux_loss(layer.loss_coefficients)                      # 0.001 * seq_load_balance
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from impls.functional import (
    expert_counts,
    load_balance_loss,
    masked_mean,
    sequence_load_balance_loss,
    topk,
    z_loss,
)
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig, all_reduce_sum, recomputing_in_backward

__all__ = ["DeepSeekConfig", "DeepSeekRouter", "group_limited_mask"]


@dataclass(frozen=True, kw_only=True)
class DeepSeekConfig(RouterConfig):
    """Options of ``DeepSeekRouter``.

    Attributes:
        k: routed experts per token (``K_r``).
        score_func: ``"softmax"`` (DeepSeekMoE, V2), ``"sigmoid"`` (V3, loss-free balancing) or
            ``"sqrt_softplus"`` (V4: ``sqrt(softplus(h))``).
        normalize: renormalize the selected scores to sum 1 (V3) before scaling.
        routed_scaling_factor: ``gamma_r``, multiplies the combine weights.
        n_group: expert groups (devices / nodes); 1 disables group-limited routing.
        topk_group: groups each token may use.
        group_score: ``"max"`` (V2: best expert of the group) or ``"top2_sum"`` (V3).
        aux_free_bias: keep a selection-only bias updated by ``DeepSeekRouter.update_bias()``.
        bias_update_rate: ``u`` of the sign rule.
        balance_counts: which choices the balance losses count in ``f_i``: ``"selected"`` (the
            experts actually chosen, biased and group-limited: DeepSeekMoE and V2, eq. 12, "token
            t selects expert i") or ``"unbiased_topk"`` (V3 eq. 18: the plain top-``K_r`` of the
            unbiased affinities ``s_{i,t}``, no bias and no group limit, as Megatron-Core computes
            it for its sequence-level loss).
    """

    k: int = 6
    score_func: Literal["softmax", "sigmoid", "sqrt_softplus"] = "softmax"
    normalize: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: Literal["max", "top2_sum"] = "max"
    balance_counts: Literal["selected", "unbiased_topk"] = "selected"
    aux_free_bias: bool = False
    bias_update_rate: float = 1e-3

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.score_func not in ("softmax", "sigmoid", "sqrt_softplus"):
            raise ValueError(
                f"score_func must be 'softmax', 'sigmoid' or 'sqrt_softplus', got {self.score_func!r}"
            )
        if self.balance_counts not in ("selected", "unbiased_topk"):
            raise ValueError(
                f"balance_counts must be 'selected' or 'unbiased_topk', got {self.balance_counts!r}"
            )
        if self.group_score not in ("max", "top2_sum"):
            raise ValueError(f"group_score must be 'max' or 'top2_sum', got {self.group_score!r}")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        if self.bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {self.bias_update_rate}")
        if self.n_group < 1 or num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must be >= 1 and divide num_experts={num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        per_group = num_experts // self.n_group
        if self.k > self.topk_group * per_group:
            raise ValueError(
                f"k={self.k} exceeds the topk_group={self.topk_group} groups x {per_group} experts per group "
                f"(num_experts={num_experts} / n_group={self.n_group}) that a token may use; lower k, "
                "or raise topk_group, or use fewer groups"
            )
        if self.group_score == "top2_sum" and self.n_group > 1 and per_group < 2:
            raise ValueError(f"group_score='top2_sum' needs >= 2 experts per group, got {per_group}")
        if self.k == 1 and self.normalize:
            raise ValueError("k=1 with normalize=True makes the only weight constant: no router gradient")


def group_limited_mask(
    select_TE: torch.Tensor, n_group: int, topk_group: int, group_score: str
) -> torch.Tensor:
    """``bool [T, E]``: experts inside each token's ``topk_group`` best groups."""
    T, E = select_TE.shape
    grouped = select_TE.view(T, n_group, E // n_group)
    score_TG = grouped.max(-1).values if group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
    top_g = topk(score_TG, topk_group)[1]
    keep_TG = torch.zeros_like(score_TG, dtype=torch.bool).scatter(1, top_g, True)
    return keep_TG[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)


@register_router
class DeepSeekRouter(Router):
    """DeepSeek routing: softmax/sigmoid scores, group-limited top-k, routed scaling, loss-free bias.

    Dai et al., "DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts
    Language Models", 2024, arXiv 2401.06066 (Sec. 3.1-3.2 fine-grained and shared experts, Sec. 3.3
    expert-level balance loss).
    DeepSeek-AI, "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language
    Model", 2024, arXiv 2405.04434 (Sec. 2.2.2 device-limited routing, Sec. 2.2.3 balance losses).
    DeepSeek-AI, "DeepSeek-V3 Technical Report", 2024, arXiv 2412.19437 (Sec. 2.1.2: sigmoid gating,
    bias-based balancing, sequence-wise loss). Wang, Gao, Zhao, Sun, Dai, "Auxiliary-Loss-Free Load
    Balancing Strategy for Mixture-of-Experts", 2024, arXiv 2408.15664 (Sec. 3, Algorithm 1).
    Equation numbers are not given where they could not be checked against the papers.
    """

    name = "deepseek"
    papers = (
        "deepseekmoe",
        "deepseek-v2",
        "deepseek-v3",
        "aux-loss-free-balancing",
        "deepseek-v4",
        "kimi-k2",
        "latent-moe",
    )
    causal = True
    Config = DeepSeekConfig
    fp32_buffers = ("expert_bias", "tokens_per_expert")

    def __init__(self, d_model: int, num_experts: int, config=None, **options):
        super().__init__(d_model, num_experts, config, **options)
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer(
            "tokens_per_expert", torch.zeros(num_experts, dtype=torch.float32), persistent=False
        )
        self.bias_update_rate = self.config.bias_update_rate
        #: set True under reentrant activation checkpointing (see the module docstring)
        self.count_during_recompute = False

    @property
    def combine_normalization(self) -> float | str | None:
        cfg = self.config
        if cfg.normalize:
            return cfg.routed_scaling_factor
        if cfg.score_func == "softmax" and cfg.routed_scaling_factor == 1.0:
            return "at_most_one"
        return None

    def _counting(self) -> bool:
        # once per training forward with autograd on; a recomputation inside backward counts only
        # when the first forward could not (reentrant checkpointing runs it under no_grad)
        if not (self.config.aux_free_bias and self.training and torch.is_grad_enabled()):
            return False
        in_backward = recomputing_in_backward()
        return not in_backward or self.count_during_recompute

    def affinities(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """``[T, E]`` affinities ``s``: softmax, sigmoid or DeepSeek-V4's ``sqrt(softplus(h))``."""
        cfg = self.config
        if cfg.score_func == "softmax":
            return torch.softmax(logits_TE, dim=-1)
        if cfg.score_func == "sigmoid":
            return torch.sigmoid(logits_TE)
        return torch.sqrt(torch.nn.functional.softplus(logits_TE))

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        cfg, E = self.config, self.num_experts
        scores_TE = self.affinities(logits_TE)
        if cfg.score_func == "softmax":
            probs_TE = scores_TE
        else:
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        select_TE = scores_TE.detach()
        if cfg.aux_free_bias:
            select_TE = select_TE + self.expert_bias
        if cfg.n_group > 1:
            allowed_TE = group_limited_mask(select_TE, cfg.n_group, cfg.topk_group, cfg.group_score)
            select_TE = select_TE.masked_fill(~allowed_TE, float("-inf"))
        ids_TK = topk(select_TE, cfg.k)[1]
        w_TK = scores_TE.gather(1, ids_TK)  # unbiased scores, as computed
        if cfg.normalize:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        w_TK = w_TK * cfg.routed_scaling_factor
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        if self._counting():
            with torch.no_grad():
                self.tokens_per_expert += expert_counts(ids_TK, E, token_mask_T)
        seq = self.sequence_length or logits_TE.shape[0]
        count_TK = ids_TK if cfg.balance_counts == "selected" else topk(scores_TE.detach(), cfg.k)[1]
        losses = {
            "load_balance": load_balance_loss(probs_TE, count_TK, token_mask_T),
            "seq_load_balance": sequence_load_balance_loss(probs_TE, count_TK, seq, token_mask_T),
            "z_loss": z_loss(logits_TE, token_mask_T),
        }
        if cfg.n_group > 1:
            losses.update(self._group_losses(probs_TE, ids_TK, token_mask_T))
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        # the plan's scores are the affinities where they lie in [0, 1], else normalized over the experts
        plan_scores_TE = probs_TE if cfg.score_func == "sqrt_softplus" else scores_TE
        return RoutingPlan(ids_TK, w_TK, keep_TK, plan_scores_TE, logits_TE, losses, token_mask_T)

    def _group_losses(self, probs_TE, ids_TK, token_mask_T) -> dict[str, torch.Tensor]:
        """DeepSeek-V2 device- and communication-balance losses, groups as devices (balanced -> 1)."""
        cfg, E = self.config, self.num_experts
        D, per = cfg.n_group, E // cfg.n_group
        counts_E = expert_counts(ids_TK, E, token_mask_T)
        f_E = E * counts_E / counts_E.sum().clamp_min(1)  # N_r / (K_r T) * count
        P_D = masked_mean(probs_TE, token_mask_T).view(D, per).sum(-1)
        device_balance = (f_E.view(D, per).mean(-1) * P_D).sum()
        T = ids_TK.shape[0]
        sent_TD = torch.zeros(T, D, device=ids_TK.device).scatter(1, ids_TK // per, 1.0)
        sent_D = masked_mean(sent_TD, token_mask_T)  # share of tokens sent to each device
        comm_balance = (D / cfg.topk_group) * (sent_D * P_D).sum()
        return {"device_balance": device_balance, "comm_balance": comm_balance}

    def on_optimizer_step(self, process_group=None) -> None:
        """``update_bias(process_group)``: the bias moves once per optimizer step."""
        self.update_bias(process_group)

    @torch.no_grad()
    def update_bias(self, process_group=None) -> torch.Tensor:
        """Apply ``b_i += u * sign(mean(c) - c_i)`` to the counts since the last call; reset them.

        Call once per optimizer step. With ``process_group`` (and ``torch.distributed``
        initialized) the counts are summed over its ranks first, so every rank applies the same
        update. Returns the counts used. No-op when the router has no bias.
        """
        counts = self.tokens_per_expert.clone()
        if not self.config.aux_free_bias:
            return counts
        all_reduce_sum(counts, process_group)
        # no counts since the last call give sign(0) = 0: no change (and no host sync to check)
        self.expert_bias += self.bias_update_rate * torch.sign(counts.mean() - counts)
        self.tokens_per_expert.zero_()
        return counts


_SHARED = {"activation": "swiglu"}

DEEPSEEKMOE_2B = register_preset(
    Preset(
        name="deepseekmoe_2b",
        router="deepseek",
        options={"k": 7},
        num_experts=63,
        layer={**_SHARED, "num_shared_experts": 1},
        loss_coefficients={"seq_load_balance": 0.01},
        papers=("deepseekmoe",),
        description=(
            "DeepSeekMoE 2B (Dai et al. 2024, arXiv 2401.06066): 1 shared + 63 routed experts, top-7."
        ),
        deviations="alpha_1 = 0.01 as quoted from the paper; the device-level loss is not used (one device).",
    )
)
DEEPSEEKMOE_16B = register_preset(
    Preset(
        name="deepseekmoe_16b",
        router="deepseek",
        options={"k": 6},
        num_experts=64,
        layer={**_SHARED, "num_shared_experts": 2},
        loss_coefficients={"seq_load_balance": 0.001},
        papers=("deepseekmoe",),
        description=(
            "DeepSeekMoE 16B (Dai et al. 2024, arXiv 2401.06066): 2 shared + 64 routed experts, top-6."
        ),
        deviations="alpha_1 = 0.001 as quoted; sequence-level form from the released config (seq_aux).",
    )
)
DEEPSEEK_V2_LITE = register_preset(
    Preset(
        name="deepseek_v2_lite",
        router="deepseek",
        options={"k": 6},
        num_experts=64,
        layer={**_SHARED, "num_shared_experts": 2},
        loss_coefficients={"seq_load_balance": 0.001},
        papers=("deepseek-v2",),
        description=(
            "DeepSeek-V2-Lite (DeepSeek-AI 2024, arXiv 2405.04434): 2 shared + 64 routed, top-6, no groups."
        ),
        deviations="Values from the released config.json (aux_loss_alpha 0.001, seq_aux).",
    )
)
DEEPSEEK_V2 = register_preset(
    Preset(
        name="deepseek_v2",
        router="deepseek",
        options={"k": 6, "n_group": 8, "topk_group": 3, "group_score": "max", "routed_scaling_factor": 16.0},
        num_experts=160,
        layer={**_SHARED, "num_shared_experts": 2},
        loss_coefficients={"seq_load_balance": 0.003, "device_balance": 0.05, "comm_balance": 0.02},
        papers=("deepseek-v2",),
        description=(
            "DeepSeek-V2 (DeepSeek-AI 2024, arXiv 2405.04434): 2 shared + 160 routed, top-6 within 3 of 8 "
            "device groups, routed scaling 16."
        ),
        deviations=(
            "Device-level token dropping is not modelled; device and communication losses are batch-level; "
            "loss weights as quoted from the paper."
        ),
    )
)
DEEPSEEK_V3 = register_preset(
    Preset(
        name="deepseek_v3",
        router="deepseek",
        options={
            "k": 8,
            "score_func": "sigmoid",
            "normalize": True,
            "routed_scaling_factor": 2.5,
            "n_group": 8,
            "topk_group": 4,
            "group_score": "top2_sum",
            "aux_free_bias": True,
            "bias_update_rate": 1e-3,
            "balance_counts": "unbiased_topk",
        },
        num_experts=256,
        layer={**_SHARED, "num_shared_experts": 1},
        loss_coefficients={"seq_load_balance": 1e-4},
        papers=("deepseek-v3", "aux-loss-free-balancing"),
        description=(
            "DeepSeek-V3 (DeepSeek-AI 2024, arXiv 2412.19437): 1 shared + 256 routed, sigmoid top-8 "
            "within 4 of 8 node groups, renormalized x 2.5, loss-free bias (u=0.001) plus a 1e-4 "
            "sequence-wise loss."
        ),
        deviations=(
            "The update speed schedule (0.001, then 0 for the last 500B tokens) is left to the caller."
        ),
    )
)
AUX_LOSS_FREE = register_preset(
    Preset(
        name="aux_loss_free",
        router="deepseek",
        options={
            "k": 6,
            "score_func": "sigmoid",
            "normalize": True,
            "aux_free_bias": True,
            "bias_update_rate": 1e-3,
        },
        num_experts=64,
        layer={**_SHARED, "num_shared_experts": 2},
        papers=("aux-loss-free-balancing",),
        description=(
            "Loss-Free Balancing (Wang et al. 2024, arXiv 2408.15664): sigmoid gate, selection-only "
            "expert bias updated by u * sign(mean load - load), no auxiliary loss."
        ),
        deviations=(
            "The 64 routed / 2 shared / top-6 backbone is illustrative; renormalizing the sigmoid gates "
            "is assumed."
        ),
    )
)
KIMI_K2 = register_preset(
    Preset(
        name="kimi_k2",
        router="deepseek",
        options={
            "k": 8,
            "score_func": "sigmoid",
            "normalize": True,
            "routed_scaling_factor": 2.827,
            "aux_free_bias": True,
            "bias_update_rate": 1e-3,
            "balance_counts": "unbiased_topk",
        },
        num_experts=384,
        layer={**_SHARED, "num_shared_experts": 1},
        loss_coefficients={"seq_load_balance": 1e-3},
        papers=("kimi-k2",),
        description=(
            "Kimi K2 (Kimi Team 2025, arXiv 2507.20534), DeepSeek-V3's router on 1 shared + 384 routed "
            "experts: sigmoid top-8 with a loss-free selection bias, one expert group, renormalized x 2.827; "
            "the first layer is dense."
        ),
        deviations=(
            "Values from the released config.json (n_group 1, routed_scaling_factor 2.827, aux_loss_alpha "
            "0.001 with seq_aux); the bias update speed 0.001 is DeepSeek-V3's, not stated for K2."
        ),
    )
)
