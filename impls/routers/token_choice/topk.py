r"""Dropless top-k softmax routing (Mixtral, Jamba, DBRX, JetMoE, Qwen1.5-MoE, Skywork-MoE).

The router of most open MoE language models. Each token's gate logits $h = x W_r$ (no bias)
go through a softmax over all $E$ experts; the $k$ largest probabilities pick the experts and,
renormalized over the chosen ones, become the combine weights:

$$
p = \operatorname{softmax}(h), \qquad
\mathcal{T} = \operatorname{TopK}(p, k), \qquad
g_i = \frac{p_i}{\sum_{j \in \mathcal{T}} p_j} \;\; (i \in \mathcal{T}), \qquad
y = \sum_{i \in \mathcal{T}} g_i \, E_i(x).
$$

Renormalizing after the softmax equals a softmax over the $k$ kept logits ("softmax after
top-k", JetMoE's and Mixtral's reference code): both orders are offered and give the same
weights. Without renormalization (`normalize=False`, Qwen1.5-MoE) the weights are the raw
probabilities and sum to less than one. DBRX divides by the $p$-norm of the kept weights
($p = 1$ is ordinary renormalization).

**Skywork-MoE gating-logit normalization** (Wei et al. 2024, arXiv 2406.06563, Sec. 3.1)
standardizes the logits before the softmax, $\tilde h = \lambda \, (h - \mu(h)) / \sigma(h)$, so
$\lambda$ alone sets how peaked the distribution is (`logit_norm_scale`).

No capacity limit by default (dropless): every token reaches its $k$ experts. Balance comes from
the Switch-style loss computed on this decision, before any capacity,

$$
\mathcal{L}_\text{bal} = E \sum_{i=1}^{E} f_i P_i, \qquad
f_i = \frac{\#\{(t, j) : \text{slot } j \text{ of token } t \text{ chose } i\}}{k \, T}, \qquad
P_i = \frac{1}{T} \sum_t p_{t,i},
$$

which equals $1$ for a perfectly balanced router for every $k$ (Hugging Face's Mixtral code
reports $k$ times this value), and the router z-loss
$\mathcal{L}_z = \frac{1}{T}\sum_t \big(\log\sum_i e^{h_{t,i}}\big)^2$ (ST-MoE eq. 5). Both are
returned unweighted as `load_balance` and `z_loss`; weight them with `plan.aux_loss(...)`.

**SparseMixer-v2 / GRIN** (Liu et al. 2024, "GRIN: GRadient-INformed MoE", arXiv 2409.12136,
Sec. 3 and App. A, Algorithm 1; `estimator="sparsemixer"`) replaces the top-$k$ choice and its
gradient. For each slot in turn, with $z$ the logits (the experts already chosen removed) and
$z^* = \max z$, the experts far from the best are masked,
$\mathcal{M} = \{ i : (z^* - z_i) / \max(|z_i|, z^*) \le 2\epsilon \}$ (the released code's form of
App. A.1's MaskedSoftmax, $\epsilon = 0.01$), and $\pi = \operatorname{softmax}(z_\mathcal{M})$ is
the softmax over the survivors. In training the expert $D$ is *sampled* from $\pi$ (Gumbel-max)
and its weight is $c\,\pi_D$ with $c = 1$ when $D$ is the argmax or with probability $1/4$ and
$c = 1/3$ otherwise (Heun's third-order method: $f(x) - f(0) \approx \tfrac14 f'(x) + \tfrac34
f'(x/3)$); the router gradient is $\partial \pi_D / \partial z_j = \pi_D(\delta_{jD} - \pi_j)$
whatever $c$ is, so the weight is $c\,\pi_D$ forward and a straight-through $\pi_D$ backward.
In `eval()` the choice is the argmax and the weight $\pi_D$ (deterministic). The next slot
repeats this with $D$ removed. The weights are not renormalized across slots (each is a
probability of its own masked softmax). The balance loss is the Switch loss above, with the
fractions $f_i$ counted on the experts actually chosen (the paper's "fraction of tokens routed
to expert $i$", computed there across the data-parallel group).

**Global-batch balance** (Qiu et al., "Demons in the Detail", 2025, arXiv 2501.11873; Qwen3-MoE;
`global_balance=True`): a micro-batch is too small and too homogeneous (one domain, one document)
for $f_i$ to say whether the router is balanced, and balancing each one forces every sequence to
use every expert. The global-batch loss keeps $P_i$ local but takes $f_i$ from the counts of all
micro-batches since the last optimizer step (a running sum, reset by `on_optimizer_step()`) and,
when `router.balance_group` is set, summed over that process group in every training forward
(one all-reduce of $E$ floats; Megatron-Core's `global_aux_loss`), kept by
`impls.balance.GlobalLoadBalance`. In `eval()` the counts are the batch's own.

## Defaults and what is confirmed

| preset | E | k | weights | balance loss weight |
|---|---|---|---|---|
| `mixtral_8x7b` | 8 | 2 | renormalized | 0.02 |
| `jamba` | 16 | 2 | renormalized | 0.001 |
| `dbrx` | 16 | 4 | $p$-norm, $p=1$ | 0.05 |
| `jetmoe` | 8 | 2 | softmax after top-k | 0.01 (z-loss 0.001) |
| `qwen1_5_moe` | 60 | 4 | raw probabilities | 0.001 |
| `skywork_moe` | 16 | 2 | renormalized, logit norm | 0.01 |
| `grin_moe` | 16 | 2 | SparseMixer-v2, $\epsilon = 0.01$ | 0 (released config) |

Sources: Mixtral — paper and Hugging Face code; the weight 0.02 is the released `config.json`'s
(the paper gives none). Jamba — Hugging Face config; 0.001 is its default. DBRX — HF/vLLM code;
the weight is unconfirmed (MegaBlocks' default is 0.1). JetMoE — HF config (`aux_loss_coef`
0.01); the z-loss weight is unconfirmed. Qwen1.5-MoE — HF config: a shared expert 4x an
expert's width behind a sigmoid gate. Skywork-MoE — $\lambda = 1$ and the weight are
assumptions. GRIN-MoE — its released Hugging Face config (16 experts, top-2,
`router_jitter_noise` = $\epsilon$ = 0.01, input jitter 0.01, `router_aux_loss_coef` 0.0; the
same values as Phi-3.5-MoE's config, read from copies of it); the SparseMixer-v2 steps follow
the authors' `microsoft/SparseMixer` code and Hugging Face's `modeling_phimoe.py`, which agree.

**Deviations.** Skywork-MoE trains with a capacity limit and adapts its auxiliary-loss weight per
layer from the drop rate; the preset is dropless and has one fixed weight (enable capacity with
`capacity_factor=...`). `k = 1` together with renormalization (or softmax after top-k) is
rejected: the only weight would be the constant 1 and the router would get no gradient from
the task loss (a known trap, Megatron-LM refuses it too).
SparseMixer: the released code handles $k = 2$ only; here any $k$ repeats the step with the
chosen experts removed (App. A's Algorithm 3 samples without replacement the same way). The
code's $1/3$ is written 0.3333 there; here it is exactly $1/3$. The exponential draw behind the
Gumbel noise is clamped away from 0 (the released code can produce an infinite noise value).
Hugging Face's Phi-MoE computes its balance loss on a fresh top-2 of the raw softmax instead of
the sampled choices; this router uses the sampled choices, as the paper defines $f_i$.

## Usage

```python
import torch, impls

router = impls.build_router("mixtral_8x7b", d_model=32)      # 8 experts, top-2
plan = router(torch.randn(6, 32))
print(plan.expert_ids_TK.shape, plan.weights_TK.sum(-1))      # [6, 2], all ones
loss = plan.aux_loss({"load_balance": 0.02})

layer = impls.MoELayer(32, 64, router="dbrx", activation="swiglu")  # 16 experts, top-4
out, plan = layer(torch.randn(2, 5, 32))
print(out.shape, plan.experts_per_token)
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from impls.balance import GlobalLoadBalance
from impls.functional import expert_counts, load_balance_loss, load_balance_loss_from_counts, topk, z_loss
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig, recomputing_in_backward

__all__ = ["TopKConfig", "TopKRouter", "sparsemixer_topk", "standardize_logits", "topk_softmax"]


@dataclass(frozen=True, kw_only=True)
class TopKConfig(RouterConfig):
    """Options of ``TopKRouter``.

    Attributes:
        k: experts per token (default 2).
        softmax_order: ``"before"`` (softmax over all experts, then top-k) or ``"after"`` (top-k
            of the logits, then a softmax over the k kept logits: always normalized).
        normalize: renormalize the kept probabilities (``softmax_order="before"`` only).
        norm_p: the norm used by ``normalize`` (DBRX's ``moe_normalize_expert_weights``; 1 = sum).
        logit_norm_scale: Skywork-MoE's $\\lambda$; ``None`` disables logit normalization.
        estimator: ``"topk"`` (deterministic top-k, exact gradient of the kept weights) or
            ``"sparsemixer"`` (GRIN's SparseMixer-v2: masked-softmax sampling with a straight-through
            router gradient in training; ``softmax_order``, ``normalize`` and ``norm_p`` do not apply).
        global_balance: also return ``global_load_balance``, the balance loss with the expert
            fractions ``f_i`` counted over every micro-batch since the last optimizer step (and over
            ``router.balance_group``'s ranks), the router probabilities ``P_i`` local (Qiu et al. 2025).
        sparsemixer_eps: SparseMixer's mask threshold $\\epsilon$ (experts with
            $(z^* - z_i)/\\max(|z_i|, z^*) > 2\\epsilon$ are masked); GRIN's ``router_jitter_noise``.
    """

    k: int = 2
    softmax_order: Literal["before", "after"] = "before"
    normalize: bool = True
    norm_p: float = 1.0
    logit_norm_scale: float | None = None
    estimator: Literal["topk", "sparsemixer"] = "topk"
    sparsemixer_eps: float = 0.01
    global_balance: bool = False

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.softmax_order not in ("before", "after"):
            raise ValueError(f"softmax_order must be 'before' or 'after', got {self.softmax_order!r}")
        if self.norm_p <= 0:
            raise ValueError(f"norm_p must be > 0, got {self.norm_p}")
        if self.logit_norm_scale is not None and self.logit_norm_scale <= 0:
            raise ValueError(f"logit_norm_scale must be > 0 or None, got {self.logit_norm_scale}")
        if self.estimator not in ("topk", "sparsemixer"):
            raise ValueError(f"estimator must be 'topk' or 'sparsemixer', got {self.estimator!r}")
        if not self.sparsemixer_eps >= 0:
            raise ValueError(f"sparsemixer_eps must be >= 0, got {self.sparsemixer_eps}")
        if self.estimator == "topk" and self.k == 1 and (self.softmax_order == "after" or self.normalize):
            raise ValueError(
                "k=1 with normalize=True or softmax_order='after' makes the only weight the constant 1, "
                "so the router gets no gradient from the task loss; use normalize=False (Switch-style)"
            )


def standardize_logits(logits_TE: torch.Tensor, scale: float) -> torch.Tensor:
    """Skywork-MoE gating-logit normalization ``scale * (h - mean) / std`` per token."""
    mean = logits_TE.mean(-1, keepdim=True)
    std = logits_TE.std(-1, keepdim=True, unbiased=False)
    return scale * (logits_TE - mean) / (std + 1e-6)


def topk_softmax(
    logits_TE: torch.Tensor, k: int, *, order: str = "before", normalize: bool = True, p: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probs_TE, expert_ids_TK, weights_TK)`` of softmax top-k routing (float32)."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    if order == "after":
        top_logits, ids = topk(logits_TE, k)
        return probs_TE, ids, torch.softmax(top_logits.float(), dim=-1)
    top_p, ids = topk(probs_TE, k)
    if normalize:
        denom = top_p.sum(-1, keepdim=True) if p == 1.0 else top_p.norm(p=p, dim=-1, keepdim=True)
        top_p = top_p / denom.clamp_min(1e-20)
    return probs_TE, ids, top_p


def sparsemixer_topk(
    logits_TE: torch.Tensor, k: int, eps: float = 0.01, *, training: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(expert_ids_TK, weights_TK)`` of SparseMixer-v2 routing (GRIN, arXiv 2409.12136, App. A, Alg. 1).

    Slot by slot: mask the experts with ``(z* - z_i) / max(|z_i|, z*) > 2 eps`` (``z*`` the best
    remaining logit; the numerator and ``|z_i|`` use the unmasked logits, as the released code does),
    take the softmax ``pi`` over the survivors, choose ``D`` (a Gumbel-max sample in training, the
    argmax in eval) and weight it ``c * pi_D`` forward with the gradient of ``pi_D`` backward; ``c`` is
    1 when ``D`` is the argmax or with probability 1/4, else 1/3 (training only). ``D`` is removed
    before the next slot. Random draws per slot: an ``[T, E]`` exponential, then a ``[T, 1]`` uniform.
    """
    z_TE = logits_TE.float()
    T, E = z_TE.shape
    neg_inf = torch.finfo(z_TE.dtype).min
    removed_TE = torch.zeros(T, E, dtype=torch.bool, device=z_TE.device)
    ids, weights = [], []
    for _ in range(k):  # k slots (sequential by definition), vectorized over tokens and experts
        remaining_TE = z_TE.masked_fill(removed_TE, neg_inf)
        with torch.no_grad():
            best_T1, argmax_T1 = topk(remaining_TE, 1)
            far_TE = (best_T1 - z_TE) / z_TE.abs().clamp(min=best_T1) > 2 * eps  # 0/0 = NaN: kept
            dropped_TE = far_TE | removed_TE
        gates_TE = remaining_TE.masked_fill(dropped_TE, float("-inf"))
        pi_TE = torch.softmax(gates_TE, dim=-1)
        if training:
            with torch.no_grad():
                expo_TE = torch.empty_like(gates_TE).exponential_().clamp_min(torch.finfo(z_TE.dtype).tiny)
                sel_T1 = (gates_TE - expo_TE.log()).argmax(-1, keepdim=True)  # Gumbel-max: D ~ pi
                full_T1 = (sel_T1 == argmax_T1) | (torch.rand_like(best_T1) > 0.75)
                c_T1 = torch.where(full_T1, 1.0, 1.0 / 3.0)
            p_T1 = pi_TE.gather(1, sel_T1)
            w_T1 = c_T1 * p_T1.detach() + (p_T1 - p_T1.detach())  # value c*pi_D, gradient of pi_D
        else:
            sel_T1 = argmax_T1
            w_T1 = pi_TE.gather(1, sel_T1)
        ids.append(sel_T1)
        weights.append(w_T1)
        removed_TE = removed_TE.scatter(1, sel_T1, True)
    return torch.cat(ids, dim=1), torch.cat(weights, dim=1)


@register_router
class TopKRouter(Router):
    """Token-choice top-k softmax router, dropless by default.

    Mixtral: Jiang et al., "Mixtral of Experts", 2024, arXiv 2401.04088, Sec. 2.1 (eq. for
    $G(x) = \\operatorname{Softmax}(\\operatorname{TopK}(x W_g))$). Jamba: Lieber et al., 2024,
    arXiv 2403.19887. DBRX: Databricks model release, 2024. JetMoE: Shen et al., 2024,
    arXiv 2404.07413. Qwen1.5-MoE: Qwen team model release, 2024. Skywork-MoE: Wei et al., 2024,
    arXiv 2406.06563, Sec. 3.1 (gating logit normalization). SparseMixer-v2: Liu et al., "GRIN:
    GRadient-INformed MoE", 2024, arXiv 2409.12136, App. A (Algorithm 1). Balance loss: Fedus et al. 2021,
    arXiv 2101.03961, eq. 4-6; z-loss: Zoph et al. 2022, arXiv 2202.08906, eq. 5.
    """

    name = "topk"
    papers = (
        "mixtral-8x7b",
        "jamba",
        "dbrx",
        "jetmoe",
        "qwen1-5-moe",
        "skywork-moe",
        "grin",
        "olmoe",
        "qwen3",
        "global-batch-balance",
        "gpt-oss",
    )
    causal = True
    Config = TopKConfig

    def __init__(self, d_model: int, num_experts: int, config=None, **options):
        super().__init__(d_model, num_experts, config, **options)
        #: process group whose counts the global-batch balance loss sums (``None``: this process)
        self.balance_group = None
        self._global = GlobalLoadBalance(num_experts) if self.config.global_balance else None

    @property
    def global_counts(self) -> torch.Tensor:
        """The expert counts pooled since the last optimizer step (zeros when none)."""
        c = None if self._global is None else self._global.counts_E
        return c if c is not None else torch.zeros(self.num_experts)

    def _global_balance(self, plan: RoutingPlan) -> torch.Tensor:
        """Global-batch balance loss: ``f`` from the step's pooled counts (training), ``P`` local."""
        if self.training and torch.is_grad_enabled() and not recomputing_in_backward():
            self._global.process_group = self.balance_group
            return self._global.loss(plan)
        counts_E = expert_counts(plan.expert_ids_TK, self.num_experts, plan.token_mask_T)
        return load_balance_loss_from_counts(plan.scores_TE, counts_E, plan.token_mask_T)

    def on_optimizer_step(self, process_group=None) -> None:
        """Reset the global-batch counts (a new global batch starts)."""
        if self._global is not None:
            self._global.reset()

    @property
    def combine_normalization(self) -> float | str | None:
        cfg = self.config
        if cfg.estimator == "sparsemixer":
            return None  # one masked softmax per slot: a token's weights may sum to more than 1
        if cfg.softmax_order == "after" or (cfg.normalize and cfg.norm_p == 1.0):
            return 1.0
        return "at_most_one" if not cfg.normalize else None

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        cfg = self.config
        h_TE = logits_TE
        if cfg.logit_norm_scale is not None:
            h_TE = standardize_logits(logits_TE, cfg.logit_norm_scale)
        if cfg.estimator == "sparsemixer":
            probs_TE = torch.softmax(h_TE, dim=-1)
            ids_TK, w_TK = sparsemixer_topk(h_TE, cfg.k, cfg.sparsemixer_eps, training=self.training)
        else:
            probs_TE, ids_TK, w_TK = topk_softmax(
                h_TE, cfg.k, order=cfg.softmax_order, normalize=cfg.normalize, p=cfg.norm_p
            )
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        losses = {
            "load_balance": load_balance_loss(probs_TE, ids_TK, token_mask_T),
            "z_loss": z_loss(h_TE, token_mask_T),
        }
        plan = RoutingPlan(ids_TK, w_TK, keep_TK, probs_TE, logits_TE, losses, token_mask_T)
        if cfg.global_balance:
            plan = dataclasses.replace(
                plan, losses={**losses, "global_load_balance": self._global_balance(plan)}
            )
        return plan


_SWIGLU = {"activation": "swiglu"}

MIXTRAL_8X7B = register_preset(
    Preset(
        name="mixtral_8x7b",
        router="topk",
        options={"k": 2},
        num_experts=8,
        layer=_SWIGLU,
        loss_coefficients={"load_balance": 0.02},
        papers=("mixtral-8x7b",),
        description=(
            "Mixtral 8x7B (Jiang et al. 2024, arXiv 2401.04088): 8 experts, top-2, renormalized, dropless."
        ),
        deviations="Loss weight 0.02 is the released config.json value; the paper states none.",
    )
)
JAMBA = register_preset(
    Preset(
        name="jamba",
        router="topk",
        options={"k": 2, "normalize": False},
        num_experts=16,
        layer=_SWIGLU,
        loss_coefficients={"load_balance": 0.001},
        papers=("jamba",),
        description=(
            "Jamba (Lieber et al. 2024, arXiv 2403.19887): 16 experts, top-2 of the softmax, combined "
            "with the raw probabilities (no renormalization, as in the released modeling code)."
        ),
        deviations="Loss weight 0.001 is the Hugging Face default, not confirmed in the paper.",
    )
)
DBRX = register_preset(
    Preset(
        name="dbrx",
        router="topk",
        options={"k": 4, "norm_p": 1.0},
        num_experts=16,
        layer=_SWIGLU,
        loss_coefficients={"load_balance": 0.05},
        papers=("dbrx",),
        description=(
            "DBRX (Databricks 2024 model release): 16 fine-grained experts, top-4, p-norm (p=1) weights."
        ),
        deviations="No paper; the loss weight 0.05 is unconfirmed (MegaBlocks' default is 0.1).",
    )
)
JETMOE = register_preset(
    Preset(
        name="jetmoe",
        router="topk",
        options={"k": 2, "softmax_order": "after"},
        num_experts=8,
        layer=_SWIGLU,
        loss_coefficients={"load_balance": 0.01, "z_loss": 0.001},
        papers=("jetmoe",),
        description=(
            "JetMoE (Shen et al. 2024, arXiv 2404.07413): 8 experts, top-2, softmax over the kept logits."
        ),
        deviations=(
            "Only the MLP mixture is modelled (JetMoE also routes attention heads); "
            "the z-loss weight 0.001 is unconfirmed."
        ),
    )
)
QWEN1_5_MOE = register_preset(
    Preset(
        name="qwen1_5_moe",
        router="topk",
        options={"k": 4, "normalize": False},
        num_experts=60,
        layer={"activation": "swiglu", "num_shared_experts": 4, "shared_expert_gate": True},
        loss_coefficients={"load_balance": 0.001},
        papers=("qwen1-5-moe",),
        description=(
            "Qwen1.5-MoE-A2.7B (Qwen team 2024 model release): 60 experts, top-4 raw probabilities, "
            "a shared expert 4x an expert's width behind a sigmoid gate."
        ),
        deviations="No paper; values from the released Hugging Face config.",
    )
)
SKYWORK_MOE = register_preset(
    Preset(
        name="skywork_moe",
        router="topk",
        options={"k": 2, "logit_norm_scale": 1.0},
        num_experts=16,
        layer=_SWIGLU,
        loss_coefficients={"load_balance": 0.01},
        papers=("skywork-moe",),
        description=(
            "Skywork-MoE (Wei et al. 2024, arXiv 2406.06563): 16 experts, top-2, gating-logit normalization."
        ),
        deviations=(
            "lambda = 1 and the loss weight are assumptions; the paper's capacity limit and per-layer "
            "adaptive loss weights are not modelled (dropless, fixed weight)."
        ),
    )
)
GRIN_MOE = register_preset(
    Preset(
        name="grin_moe",
        router="topk",
        options={"k": 2, "estimator": "sparsemixer", "sparsemixer_eps": 0.01, "jitter_eps": 0.01},
        num_experts=16,
        layer=_SWIGLU,
        loss_coefficients={"load_balance": 0.0},
        papers=("grin",),
        description=(
            "GRIN-MoE (Liu et al. 2024, arXiv 2409.12136): 16 experts, top-2 by SparseMixer-v2 "
            "(masked-softmax sampling, eps = 0.01, straight-through router gradient), input jitter 0.01, "
            "dropless; Phi-3.5-MoE's released config has the same routing values."
        ),
        deviations=(
            "Values from the released Hugging Face config; its router_aux_loss_coef is 0.0 and the paper "
            "gives no weight for its (globally counted) balance loss, so the preset weights it 0. The "
            "released block jitters the experts' input too; here the jitter reaches the router only."
        ),
    )
)
OLMOE_1B_7B = register_preset(
    Preset(
        name="olmoe_1b_7b",
        router="topk",
        options={"k": 8, "normalize": False},
        num_experts=64,
        layer=_SWIGLU,
        loss_coefficients={"load_balance": 0.01, "z_loss": 0.001},
        papers=("olmoe",),
        description=(
            "OLMoE-1B-7B (Muennighoff et al. 2024, arXiv 2409.02060): 64 experts, top-8 of the softmax "
            "with the raw probabilities as weights, dropless, balance loss 0.01 and router z-loss 0.001."
        ),
        deviations=(
            "Values from the released training config (moe_loss_weight 0.01, moe_zloss_weight 0.001) and "
            "Hugging Face's OlmoeConfig (norm_topk_prob false); MegaBlocks' z-loss normalization differs."
        ),
    )
)
QWEN3_30B_A3B = register_preset(
    Preset(
        name="qwen3_30b_a3b",
        router="topk",
        options={"k": 8, "normalize": True, "global_balance": True},
        num_experts=128,
        layer=_SWIGLU,
        loss_coefficients={"global_load_balance": 0.001},
        papers=("qwen3", "global-batch-balance"),
        description=(
            "Qwen3-30B-A3B (Qwen Team 2025): 128 experts, top-8, renormalized, no shared expert, the "
            "global-batch balance loss (Qiu et al. 2025) with weight 0.001."
        ),
        deviations=(
            "Values from copies of the released config.json (norm_topk_prob true, router_aux_loss_coef "
            "0.001); the official file was not read."
        ),
    )
)
QWEN3_235B_A22B = register_preset(
    Preset(
        name="qwen3_235b_a22b",
        router="topk",
        options={"k": 8, "normalize": True, "global_balance": True},
        num_experts=128,
        layer=_SWIGLU,
        loss_coefficients={"global_load_balance": 0.001},
        papers=("qwen3", "global-batch-balance"),
        description=(
            "Qwen3-235B-A22B (Qwen Team 2025): 128 experts of width 1536, top-8, renormalized, the "
            "global-batch balance loss with weight 0.001."
        ),
        deviations="Values from copies of the released config.json; the official file was not read.",
    )
)
_GPT_OSS = {"k": 4, "softmax_order": "after", "router_bias": True}
_GPT_OSS_LAYER = {"activation": "gpt_oss_swiglu", "expert_bias": True}
GPT_OSS_120B = register_preset(
    Preset(
        name="gpt_oss_120b",
        router="topk",
        options=_GPT_OSS,
        num_experts=128,
        layer=_GPT_OSS_LAYER,
        papers=("gpt-oss",),
        description=(
            "gpt-oss-120b (OpenAI 2025 model card, arXiv 2508.10925): a linear router with bias, top-4 of "
            "128 experts, softmax over the 4 kept logits."
        ),
        deviations=(
            "The experts' clamped SwiGLU (limit 7, alpha 1.702, +1 on the linear branch) and expert biases "
            "are modelled (activation 'gpt_oss_swiglu', expert_bias); the released weights interleave the "
            "gate and linear columns, impls.hf de-interleaves them. No balance weight (training value not "
            "published; the released config's router_aux_loss_coef 0.9 is read from copies only)."
        ),
    )
)
GPT_OSS_20B = register_preset(
    Preset(
        name="gpt_oss_20b",
        router="topk",
        options=_GPT_OSS,
        num_experts=32,
        layer=_GPT_OSS_LAYER,
        papers=("gpt-oss",),
        description=(
            "gpt-oss-20b (OpenAI 2025, arXiv 2508.10925): biased linear router, top-4 of 32, softmax over 4."
        ),
        deviations="As gpt_oss_120b: clamped SwiGLU experts with biases, no balance weight.",
    )
)
