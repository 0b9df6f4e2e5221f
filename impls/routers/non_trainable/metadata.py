r"""Metadata routing: experts chosen by a label the data carries (domain, task, language, token attribute).

Four papers route on information given with the input rather than on the token itself. Each router
takes its label as an explicit integer input (``long``, one per token or one per sequence; shape,
dtype and range errors name the input).

**DEMix** (Gururangan, Lewis, Holtzman, Smith & Zettlemoyer, "DEMix Layers: Disentangling Domains
for Modular Language Modeling", NAACL 2022, arXiv 2108.05036; official code `kernelmachine/demix`).
Every feed-forward layer holds one expert per training domain, and in training the document's
domain label picks it: `label` router, `label_ids` = domain id, expert = domain, weight 1, no gate.
At test time the domain is unknown and DEMix mixes the $N$ domain *models* (shared layers plus
domain $j$'s experts) with the posterior over domains given the context, by Bayes' rule,

$$
p(x_t \mid x_{<t}) = \sum_{j=1}^{N} p(x_t \mid x_{<t}, D = j)\; P(D = j \mid x_{<t}), \qquad
P(D = j \mid x_{<t}) \propto P(x_{<t} \mid D = j)\, P(D = j),
$$

`demix_posterior` (the prefix likelihood by default, or only the previous token's, as the
official code does) and `demix_mixture`; the prior is uniform, or an exponential moving average of
past posteriors with weight $\lambda = 0.3$ on the newest (`update_prior`, the "updating" prior;
run on held-out data of a domain it gives the "cached" prior).

**Task-MoE** (Kudugunta, Huang, Bapna, Krikun, Lepikhin, Luong & Firat, "Beyond Distillation:
Task-level Mixture-of-Experts for Efficient Inference", Findings of EMNLP 2021, arXiv 2110.03742,
Sec. 3.1). GShard's learned top-2 gate, fed not the token but the **task id** (the target language,
or the language pair): $G = \operatorname{GATE}(\text{task})$, so all tokens of a task share the
same two experts and a task's sub-network can be served alone (`task_moe`, `task_ids`). The same
section's **sentence-level** routing gates on the sentence average
$\operatorname{GATE}(\tfrac1S \sum_s x_s)$ (`sentence_moe`).

**M2M-100** (Fan et al., "Beyond English-Centric Multilingual Machine Translation", JMLR 2021,
arXiv 2010.11125, "Scaling Model Capacity with Language-Specific Parameters"): language-specific
layers, one copy per language group, chosen by the source language in the encoder and the target
language in the decoder: the `label` router with `label_to_expert` mapping languages to groups,
and the paper's random re-routing in training (`reroute_prob`: a sequence goes to another group).

**Uni-Perceiver-MoE** (Zhu et al., "Uni-Perceiver-MoE: Learning Sparse Generalist Models with
Conditional MoEs", NeurIPS 2022, arXiv 2206.04674; official code `fundamentalvision/Uni-Perceiver`,
`uniperceiver/task_moe/`, `uniperceiver/datasets/moe_embeddings.py`). *Attribute-level* conditional
routing: the gate reads a fixed binary attribute vector of the token's task and role (input or
target, modality, causal or not), never the token itself: $z = \operatorname{LN}(W_a a)$, logits
$W_g z$ (float32, no bias), softmax over noisy logits in training (noise $\mathcal N(0, 1/E^2)$, as
the released config), top-2 renormalized (`attribute_moe`, `attribute_ids` index the attribute
table; `UNI_PERCEIVER_ATTRIBUTES` holds the released vectors).

Deviations: Task-MoE's task embedding is a learned vector per task (how the id enters the gate is
not stated); M2M-100's group sizes, layer placement and re-routing probability are not taken from
the paper (pass them); the Uni-Perceiver vectors' bit meanings are read off the released code.

## Usage

```python
import torch, impls
from impls.routers.non_trainable.metadata import demix_posterior, demix_mixture

demix = impls.build_router("demix", d_model=16)                     # 8 domains, one expert each
plan = demix(torch.randn(2, 4, 16), label_ids=torch.tensor([3, 5]))  # one domain per sequence
print(plan.expert_ids_TK[:, 0])                                       # 3 3 3 3 5 5 5 5
task = impls.build_router("task_moe", d_model=16, num_experts=8, num_tasks=3)
plan = task(torch.randn(5, 16), task_ids=torch.tensor([0, 0, 1, 2, 2]))
logp = torch.log_softmax(torch.randn(8, 1, 6), 0)                     # log p(x_t | x_<t, D=j), 8 domains
w = demix_posterior(logp)                                             # [8, 1, 6], sums to 1 over domains
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from impls.functional import load_balance_loss, topk
from impls.plan import RoutingPlan, every_slot_plan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig
from impls.routers.non_trainable._gateless import GatelessRouter, zero_logits

__all__ = [
    "DEMIX",
    "M2M_100",
    "SENTENCE_MOE",
    "TASK_MOE",
    "UNI_PERCEIVER_ATTRIBUTES",
    "UNI_PERCEIVER_MOE",
    "AttributeConfig",
    "AttributeRouter",
    "LabelConfig",
    "LabelRouter",
    "SentenceRouter",
    "TaskConfig",
    "TaskRouter",
    "demix_mixture",
    "demix_posterior",
    "update_prior",
]


# ---------------------------------------------------------------------------------- labels


@dataclass(frozen=True, kw_only=True)
class LabelConfig(RouterConfig):
    """Options of ``LabelRouter``.

    Attributes:
        num_labels: distinct labels (domains, languages); ``None`` = ``num_experts``.
        label_to_expert: expert of each label (e.g. a language's group); ``None`` sends label ``l``
            to expert ``l``.
        reroute_prob: in training, the chance that a sequence goes to a uniformly drawn other expert.
    """

    num_labels: int | None = None
    label_to_expert: tuple[int, ...] | None = None
    reroute_prob: float = 0.0

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.k != 1:
            raise ValueError("a label router sends each token to its label's expert (k=1)")
        n = num_experts if self.num_labels is None else self.num_labels
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_labels must be an int >= 1, got {self.num_labels!r}")
        if self.label_to_expert is None:
            if n != num_experts:
                raise ValueError(
                    f"num_labels={n} differs from num_experts={num_experts}: give label_to_expert"
                )
        else:
            m = tuple(self.label_to_expert)
            if len(m) != n or any(not isinstance(e, int) or not 0 <= e < num_experts for e in m):
                raise ValueError(f"label_to_expert must list {n} experts in [0, {num_experts}), got {m}")
        if not 0 <= self.reroute_prob < 1:
            raise ValueError(f"reroute_prob must be in [0, 1), got {self.reroute_prob}")
        if self.reroute_prob and num_experts < 2:
            raise ValueError("reroute_prob needs at least 2 experts")


@register_router
class LabelRouter(GatelessRouter):
    """Route by a given label (DEMix domain, M2M-100 language group): expert = map[label], weight 1."""

    name = "label"
    papers = ("demix", "m2m-100")
    causal = True
    Config = LabelConfig
    config: LabelConfig
    routing_inputs = ("label_ids",)

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        cfg = self.config
        m = cfg.label_to_expert if cfg.label_to_expert is not None else range(num_experts)
        self.register_buffer("expert_of_label", torch.tensor(list(m), dtype=torch.long))

    @property
    def num_labels(self) -> int:
        return self.expert_of_label.numel()

    def input_ranges(self) -> dict[str, int]:
        return {"label_ids": self.num_labels}

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        E = self.num_experts
        ids_T = self.expert_of_label[self.inputs["label_ids"]]
        p = self.config.reroute_prob
        if self.training and p > 0:
            T = ids_T.shape[0]
            seq = self.sequence_length or 1  # one decision per sequence (per token without sequences)
            n = T // seq
            move = (torch.rand(n, device=ids_T.device) < p).repeat_interleave(seq)
            shift = torch.randint(1, E, (n,), device=ids_T.device).repeat_interleave(seq)
            ids_T = torch.where(move, (ids_T + shift) % E, ids_T)  # uniformly one of the other experts
        ids_TK = ids_T[:, None]
        scores = F.one_hot(ids_T, E).float()
        return every_slot_plan(
            ids_TK, torch.ones_like(ids_TK, dtype=torch.float32), scores, logits_TE, token_mask_T
        )


def demix_posterior(
    token_logprobs_JBL: torch.Tensor,
    prior_J: torch.Tensor | None = None,
    history: Literal["prefix", "previous"] = "prefix",
) -> torch.Tensor:
    """``P(D = j | x_<t)`` for every position: ``[J, B, L]``, summing to 1 over the ``J`` domains.

    ``token_logprobs_JBL[j, b, t] = log p(x_t | x_<t, D = j)`` from domain ``j``'s model. With
    ``history="prefix"`` (the paper's Bayes rule) position ``t`` uses ``sum_{i<t}`` of them; with
    ``"previous"`` (the official code) only position ``t - 1``. Position 0 gets the prior.
    """
    if history not in ("prefix", "previous"):
        raise ValueError(f"history must be 'prefix' or 'previous', got {history!r}")
    lp = token_logprobs_JBL.float()
    if lp.dim() != 3:
        raise ValueError(f"token_logprobs must be [domains, batch, seq], got {list(lp.shape)}")
    J = lp.shape[0]
    prior = torch.full((J,), 1.0 / J, device=lp.device) if prior_J is None else prior_J.float().to(lp.device)
    if prior.shape != (J,) or (prior < 0).any():
        raise ValueError(f"prior must be {J} non-negative weights, got {list(prior.shape)}")
    shifted = F.pad(lp[..., :-1], (1, 0))  # evidence before position t
    evidence = shifted.cumsum(-1) if history == "prefix" else shifted
    return torch.softmax(evidence + torch.log(prior.clamp_min(1e-30))[:, None, None], dim=0)


def demix_mixture(probs_JBLV: torch.Tensor, weights_JBL: torch.Tensor) -> torch.Tensor:
    """``sum_j w[j] * p_j``: the domain models' next-token distributions mixed by the posterior."""
    return (probs_JBLV.float() * weights_JBL.float()[..., None]).sum(0)


def update_prior(prior_J: torch.Tensor, posterior_BJ: torch.Tensor, decay: float = 0.3) -> torch.Tensor:
    """DEMix's updating prior: ``decay * mean_b posterior + (1 - decay) * prior`` (``decay`` = 0.3)."""
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    return decay * posterior_BJ.float().mean(0) + (1 - decay) * prior_J.float()


# ---------------------------------------------------------------------------------- Task-MoE


@dataclass(frozen=True, kw_only=True)
class TaskConfig(RouterConfig):
    """Options of ``TaskRouter`` and ``SentenceRouter``.

    Attributes:
        k: experts per task (or sentence); GShard's 2.
        num_tasks: task ids (``TaskRouter`` only).
    """

    k: int = 2
    num_tasks: int = 1

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if not isinstance(self.num_tasks, int) or self.num_tasks < 1:
            raise ValueError(f"num_tasks must be an int >= 1, got {self.num_tasks!r}")


def _top_k_plan(router: Router, logits_TE, token_mask_T) -> RoutingPlan:
    """GShard-style top-k of the softmax, renormalized over the chosen experts, and its balance loss."""
    probs = logits_TE.softmax(-1)
    vals, ids = topk(probs, router.config.k)
    weights = vals / vals.sum(-1, keepdim=True)
    losses = {"load_balance": load_balance_loss(probs, ids, token_mask_T)}
    return every_slot_plan(ids, weights, probs, logits_TE, token_mask_T, losses=losses)


class _LabelGateRouter(Router):
    """A learned top-k gate that reads a vector of the token's label, never the token itself."""

    @property
    def combine_normalization(self) -> float:
        return 1.0

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        # x enters only as 0 * x, for the edge checks; the gate runs in route() on the label
        return zero_logits(x_TD, self.num_experts)

    def label_vectors(self) -> torch.Tensor:
        """``float32 [T, D]``: the vector the gate reads for each token (from ``self.inputs``)."""
        raise NotImplementedError

    def add_noise(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return logits_TE

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        logits = super().compute_logits(self.label_vectors()) + logits_TE
        return _top_k_plan(self, self.add_noise(logits), token_mask_T)


@register_router
class TaskRouter(_LabelGateRouter):
    """Task-level routing (Kudugunta et al. 2021, Sec. 3.1): GShard's top-2 gate on a task embedding."""

    name = "task_moe"
    papers = ("task-moe",)
    causal = True
    Config = TaskConfig
    config: TaskConfig
    routing_inputs = ("task_ids",)

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        self.task_embedding = nn.Embedding(self.config.num_tasks, d_model, dtype=torch.float32)

    def input_ranges(self) -> dict[str, int]:
        return {"task_ids": self.config.num_tasks}

    def label_vectors(self) -> torch.Tensor:
        return self.task_embedding.weight.float()[self.inputs["task_ids"]]


@register_router
class SentenceRouter(Router):
    """Sentence-level routing (Kudugunta et al. 2021, Sec. 3.1): the gate reads the sentence average."""

    name = "sentence_moe"
    papers = ("task-moe",)
    causal = False
    Config = TaskConfig
    config: TaskConfig

    @property
    def combine_normalization(self) -> float:
        return 1.0

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        T, D = x_TD.shape
        seq = self.sequence_length or T  # without sequences, the batch is one sentence
        mask = torch.ones(T, dtype=torch.bool, device=x_TD.device) if token_mask_T is None else token_mask_T
        xz = torch.where(mask[:, None], x_TD, x_TD.new_zeros(()))
        m = mask.view(T // seq, seq, 1).float()
        pooled = (xz.view(T // seq, seq, D) * m).sum(1) / m.sum(1).clamp_min(1)
        logits = self.compute_logits(pooled).repeat_interleave(seq, dim=0)
        return _top_k_plan(self, logits, token_mask_T)


# ---------------------------------------------------------------------------------- Uni-Perceiver-MoE

#: The attribute vectors of the released Uni-Perceiver-MoE code (``moe_embeddings.py``), by the
#: task and the role of the tokens they tag.
UNI_PERCEIVER_ATTRIBUTES: dict[str, tuple[int, ...]] = {
    "image_classification_input": (1, 0, 0, 1, 1, 0, 0, 0),
    "text_input": (0, 1, 0, 1, 0, 1, 0, 0),
    "caption_image": (1, 1, 0, 1, 1, 0, 0, 0),
    "caption_text": (1, 1, 0, 1, 0, 1, 0, 1),
    "retrieval_text_target": (1, 0, 0, 1, 0, 1, 1, 0),
    "text_target": (1, 1, 0, 1, 0, 1, 1, 0),
}


@dataclass(frozen=True, kw_only=True)
class AttributeConfig(RouterConfig):
    """Options of ``AttributeRouter``.

    Attributes:
        k: experts per attribute (2 in the released config).
        attributes: the attribute table, one binary vector per ``attribute_ids`` value.
        noise_std: training noise on the logits is ``N(0, (noise_std / E)^2)``; 0 disables it.
    """

    k: int = 2
    attributes: tuple[tuple[int, ...], ...] = tuple(UNI_PERCEIVER_ATTRIBUTES.values())
    noise_std: float = 1.0

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        rows = tuple(tuple(r) for r in self.attributes)
        if not rows or len({len(r) for r in rows}) != 1:
            raise ValueError("attributes must be a non-empty table of equal-length vectors")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


@register_router
class AttributeRouter(_LabelGateRouter):
    """Uni-Perceiver-MoE attribute routing (Zhu et al., NeurIPS 2022): top-2 on an attribute embedding."""

    name = "attribute_moe"
    papers = ("uni-perceiver-moe",)
    causal = True
    Config = AttributeConfig
    config: AttributeConfig
    routing_inputs = ("attribute_ids",)

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        table = torch.tensor(self.config.attributes, dtype=torch.float32)
        self.register_buffer("attributes_AN", table, persistent=False)
        self.attribute_proj = nn.Linear(table.shape[1], d_model, dtype=torch.float32)
        self.attribute_norm = nn.LayerNorm(d_model, dtype=torch.float32)

    def input_ranges(self) -> dict[str, int]:
        return {"attribute_ids": self.attributes_AN.shape[0]}

    def label_vectors(self) -> torch.Tensor:
        a_TN = self.attributes_AN[self.inputs["attribute_ids"]]
        p, n = self.attribute_proj, self.attribute_norm
        z = F.linear(a_TN, p.weight.float(), p.bias.float())
        return F.layer_norm(z, (self.d_model,), n.weight.float(), n.bias.float())

    def add_noise(self, logits_TE: torch.Tensor) -> torch.Tensor:
        if self.training and self.config.noise_std > 0:
            return logits_TE + torch.randn_like(logits_TE) * (self.config.noise_std / self.num_experts)
        return logits_TE


DEMIX = register_preset(
    Preset(
        name="demix",
        router="label",
        num_experts=8,
        papers=("demix",),
        description=(
            "DEMix (Gururangan et al., NAACL 2022): 8 training domains, one expert each in every layer, "
            "chosen by the domain label; mix domain models with `demix_posterior` at test time."
        ),
    )
)

M2M_100 = register_preset(
    Preset(
        name="m2m_100",
        router="label",
        options={"reroute_prob": 0.0},
        papers=("m2m-100",),
        description=(
            "M2M-100 language-specific layers (Fan et al., JMLR 2021): one expert per language group, "
            "chosen by the language; give num_labels, label_to_expert and reroute_prob."
        ),
        deviations="Group layout and the re-routing probability are not fixed here (not verified).",
    )
)

TASK_MOE = register_preset(
    Preset(
        name="task_moe_wmt",
        router="task_moe",
        options={"k": 2, "num_tasks": 30},
        num_experts=32,
        papers=("task-moe",),
        description=(
            "Task-MoE on WMT (Kudugunta et al. 2021, Sec. 4.1): 32 experts in every other layer, top-2 "
            "by task; tasks are the 30 language pairs (or target languages)."
        ),
        deviations="The task id enters the gate as a learned embedding (not specified by the paper).",
    )
)

SENTENCE_MOE = register_preset(
    Preset(
        name="sentence_moe_wmt",
        router="sentence_moe",
        options={"k": 2},
        num_experts=32,
        papers=("task-moe",),
        description=(
            "Sentence-level MoE (Kudugunta et al. 2021, Sec. 3.1): the top-2 gate reads the mean of the "
            "sentence's token representations."
        ),
    )
)

UNI_PERCEIVER_MOE = register_preset(
    Preset(
        name="uni_perceiver_moe",
        router="attribute_moe",
        options={"k": 2, "noise_std": 1.0},
        num_experts=8,
        papers=("uni-perceiver-moe",),
        description=(
            "Uni-Perceiver-MoE attribute routing (Zhu et al., NeurIPS 2022; released base config): 8 "
            "experts in every other layer's attention and FFN projections, top-2 by token attribute."
        ),
    )
)
