r"""ModuleFormer (Shen et al. 2023): an MLP gate over attention and FFN modules, balanced by mutual info.

ModuleFormer builds every layer of a language model from two mixtures of *modules*: stick-breaking
attention experts and feed-forward experts, each with its own router. A router is a small MLP
(`Linear(d, 256) -> GELU -> Linear(256, E)`, no bias on the second), its top-$k$ experts are taken
on the softmax over all experts, and the combine weights are those **raw probabilities** (not
renormalized over the $k$):

$$
g(e \mid x) = \operatorname{softmax}\big(W_2 \operatorname{GELU}(W_1 x + b_1)\big)_e, \qquad
y = \sum_{e \in \operatorname{TopK}(g(\cdot \mid x))} g(e \mid x)\, E_e(x).
$$

**Load balancing by mutual information.** With $p(e) = \frac{1}{|X|} \sum_{x \in X} g(e \mid x)$
over the tokens $X$ of the batch, the loss is the negative mutual information between token and
module,

$$
\mathcal{L}_\text{MI} = H(e \mid x) - H(e)
= -\frac{1}{|X|}\sum_{x} \sum_e g(e \mid x) \log g(e \mid x) + \sum_e p(e) \log p(e),
$$

low when each token is sure of its modules (small $H(e \mid x)$) while the batch uses all of them
(large $H(e)$); it lies in $[-\log E, 0]$ (`mutual_information`). **Load concentration**, used
when fine-tuning on a task so that it settles on few modules and the rest can be pruned, is the
marginal entropy itself, $\mathcal{L}_\text{conc} = H(e)$ (`load_concentration`: minimize it).

**Attention modules** (`ModuleFormerAttention`) are MoA-style: each expert has its own query and
output projections, and all share one key and one value projection (identity maps when the
attention width equals the model width with one head per expert, as in the released models).
Their attention is **stick-breaking** (no positional embedding anywhere in the model): for a
query $i$ and the keys $j \le i$, $z_{ij} = \sigma(q_i \cdot k_j / \sqrt{d})$ and

$$
A_{ij} = z_{ij} \prod_{j < m \le i} (1 - z_{im}),
$$

so the stick is broken from the current token backwards and the mass left over,
$\prod_{j \le i}(1 - z_{ij})$, is dropped (a row sums to less than one). The product is taken in
log space (`stick_breaking_attention`).

## Defaults and what is confirmed

From the official code (`moduleformer/utils/gate.py`, `utils/moe.py`, `modeling_moduleformer.py`)
and the released MoLM-700M-8B configuration: gate hidden 256 with exact GELU, no gate dropout
and no noise; raw top-$k$ probabilities; the MI loss computed per gate call on the batch's tokens
(no accumulation across steps or devices), attention- and FFN-gate losses summed over layers;
16 attention experts of one 1024-wide head each with identity keys and values, top-2; 32 FFN
experts of width 2048, top-2; `gelu_new` (tanh-approximate GELU) experts; stick-breaking
attention, no positional embeddings.

**Deviations.** The paper's text beyond its abstract was not read here: its equation numbers are
not cited, and the load-concentration loss follows a secondary summary of the paper ($H(e)$ of
the batch; the released code has no such loss). The released `aux_loss_weight` is 0 (an
inference release): the pretraining weight of the MI loss is unknown, so the preset leaves it to
the user and weights it 0. The released gate lets padding tokens into routing and the loss
statistics; here padding is excluded. The code's other option, a Switch loss plus $0.1$ times the
z-loss (`aux_loss="switch"`), is offered but unused by the released models. The FFN experts of
`impls.MoELayer` use the exact GELU, not `gelu_new`.

## Usage

```python
import torch, impls
from impls.routers.token_choice.moduleformer import ModuleFormerAttention

layer = impls.MoELayer(64, 128, router="molm_700m_8b")          # 32 FFN experts, top-2
y, plan = layer(torch.randn(2, 10, 64))
loss = y.pow(2).mean() + 0.01 * plan.losses["mutual_information"]

attn = ModuleFormerAttention(64, num_experts=16, k=2)            # identity keys and values
y, plan = attn(torch.randn(2, 10, 64))                           # causal stick-breaking
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from impls.functional import load_balance_loss, masked_mean, topk, z_loss
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig
from impls.routers.token_choice.attention_heads import _dense_weights

__all__ = [
    "ModuleFormerAttention",
    "ModuleFormerConfig",
    "ModuleFormerRouter",
    "mutual_information_loss",
    "stick_breaking_attention",
]


def mutual_information_loss(
    probs_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H(e|x) - H(e), H(e))`` of a batch's routing distributions, over the valid tokens."""
    p = probs_TE.float()
    h_cond_T = -(p * torch.log(p.clamp_min(1e-20))).sum(-1)
    h_cond = masked_mean(h_cond_T, token_mask_T)
    p_E = masked_mean(p, token_mask_T)
    h_marg = -(p_E * torch.log(p_E + 1e-8)).sum()
    return h_cond - h_marg, h_marg


def stick_breaking_attention(
    q_BHLC: torch.Tensor, k_BHLC: torch.Tensor, v_BHLC: torch.Tensor, key_mask_BL: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Causal stick-breaking attention, $A_{ij} = z_{ij}\prod_{j<m\le i}(1 - z_{im})$, $z = \sigma(q k^T)$.

    (The logits $q k^T$ are scaled by $1/\sqrt{d}$, as in dot-product attention.)

    ``[B, H, L, C]`` queries, keys and values (keys and values may broadcast over ``H``);
    ``key_mask_BL`` (True = real token) keeps padded keys from taking or breaking the stick.
    Returns ``[B, H, L, C]``; each row's weights sum to ``1 - prod_j (1 - z_ij)`` < 1.
    """
    L = q_BHLC.shape[-2]
    logits = torch.matmul(q_BHLC, k_BHLC.transpose(-1, -2)).float() / math.sqrt(q_BHLC.shape[-1])
    allowed = torch.ones(L, L, dtype=torch.bool, device=q_BHLC.device).tril()
    if key_mask_BL is not None:
        allowed = allowed & key_mask_BL[:, None, None, :].bool()
    log_z = nn.functional.logsigmoid(logits).masked_fill(~allowed, float("-inf"))
    log_1mz = nn.functional.logsigmoid(-logits).masked_fill(~allowed, 0.0)
    # sum over m in (j, i] of log(1 - z_im): a reverse cumulative sum along the keys, without m = j
    after_j = log_1mz.flip(-1).cumsum(-1).flip(-1) - log_1mz
    attn = torch.exp(log_z + after_j)
    return torch.matmul(attn.to(v_BHLC.dtype), v_BHLC.expand(*q_BHLC.shape[:-1], v_BHLC.shape[-1]))


@dataclass(frozen=True, kw_only=True)
class ModuleFormerConfig(RouterConfig):
    """Options of ``ModuleFormerRouter``.

    Attributes:
        k: modules per token (2 in the released models).
        gating_size: hidden width of the gate MLP (256).
        aux_loss: ``"mi"`` (mutual information and load concentration; the released default) or
            ``"switch"`` (the code's alternative: Switch balance loss and z-loss).
    """

    k: int = 2
    gating_size: int = 256
    aux_loss: Literal["mi", "switch"] = "mi"

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if not isinstance(self.gating_size, int) or self.gating_size < 1:
            raise ValueError(f"gating_size must be an int >= 1, got {self.gating_size!r}")
        if self.aux_loss not in ("mi", "switch"):
            raise ValueError(f"aux_loss must be 'mi' or 'switch', got {self.aux_loss!r}")


@register_router
class ModuleFormerRouter(Router):
    """ModuleFormer's module gate: a 256-unit GELU MLP, top-k of the softmax, raw probabilities as weights.

    Shen, Zhang, Cao, Tan, Chen, Gan, "ModuleFormer: Modularity Emerges from Mixture-of-Experts",
    arXiv 2306.04640 (2023): mutual-information load balancing and load concentration.
    """

    name = "moduleformer"
    papers = ("moduleformer",)
    causal = True
    Config = ModuleFormerConfig
    config: ModuleFormerConfig

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        self.gate = None
        g = self.config.gating_size
        self.mlp = nn.Sequential(
            nn.Linear(d_model, g, dtype=torch.float32),
            nn.GELU(),
            nn.Linear(g, num_experts, bias=False, dtype=torch.float32),
        )

    @property
    def combine_normalization(self) -> str:
        return "at_most_one"

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.mlp[0], self.mlp[2]
        h = nn.functional.gelu(nn.functional.linear(x_TD, w1.weight.float(), w1.bias.float()))
        return nn.functional.linear(h, w2.weight.float())

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        probs_TE = torch.softmax(logits_TE, dim=-1)
        w_TK, ids_TK = topk(probs_TE, self.config.k)
        if token_mask_T is not None:
            w_TK = w_TK * token_mask_T[:, None]
        if self.config.aux_loss == "mi":
            mi, conc = mutual_information_loss(probs_TE, token_mask_T)
            losses = {"mutual_information": mi, "load_concentration": conc}
        else:
            losses = {
                "load_balance": load_balance_loss(probs_TE, ids_TK, token_mask_T),
                "z_loss": z_loss(logits_TE, token_mask_T),
            }
        keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        return RoutingPlan(ids_TK, w_TK, keep_TK, probs_TE, logits_TE, losses, token_mask_T)


class ModuleFormerAttention(nn.Module):
    """ModuleFormer's attention mixture: per-expert query/output projections, shared keys and values,
    causal stick-breaking attention, the top-k experts of a ``ModuleFormerRouter`` weighted by their
    raw probabilities.

    ``att_hidden`` is each expert's attention width (``num_heads`` heads of ``att_hidden /
    num_heads``); keys and values are identity maps when ``att_hidden == d_model`` and
    ``num_heads == 1`` (the released models), else one shared ``Linear`` each.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int = 16,
        k: int = 2,
        *,
        att_hidden: int | None = None,
        num_heads: int = 1,
        **router_options: Any,
    ):
        super().__init__()
        att_hidden = d_model if att_hidden is None else att_hidden
        if att_hidden % num_heads:
            raise ValueError(f"att_hidden={att_hidden} must be divisible by num_heads={num_heads}")
        self.d_model, self.num_experts, self.att_hidden, self.num_heads = (
            d_model,
            num_experts,
            att_hidden,
            num_heads,
        )
        self.router = ModuleFormerRouter(d_model, num_experts, k=k, **router_options)
        self.q_proj = nn.Parameter(torch.empty(num_experts, d_model, att_hidden))
        self.o_proj = nn.Parameter(torch.empty(num_experts, att_hidden, d_model))
        identity = att_hidden == d_model and num_heads == 1
        self.k_proj = nn.Identity() if identity else nn.Linear(d_model, att_hidden)
        self.v_proj = nn.Identity() if identity else nn.Linear(d_model, att_hidden)
        nn.init.uniform_(self.q_proj, -(d_model**-0.5), d_model**-0.5)
        nn.init.uniform_(self.o_proj, -(att_hidden**-0.5), att_hidden**-0.5)

    def forward(
        self,
        x_BLD: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        head_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RoutingPlan]:
        """``(y [B, L, D], plan)``; ``attention_mask [B, L]`` marks real tokens; ``head_weights [B, L, E]``
        replaces the router's weights when given. Dense reference: every expert is computed."""
        B, L, _ = x_BLD.shape
        E, H, C = self.num_experts, self.num_heads, self.att_hidden // self.num_heads
        mask = attention_mask.bool() if attention_mask is not None else None
        plan = self.router(x_BLD, mask)
        w_BLE = _dense_weights(plan, (B, L)) if head_weights is None else head_weights
        q = torch.einsum("bld,edc->belc", x_BLD, self.q_proj).reshape(B, E, L, H, C)
        q = q.permute(0, 1, 3, 2, 4).reshape(B, E * H, L, C)
        kv_shape = (B, L, H, C)
        k = self.k_proj(x_BLD).reshape(kv_shape).transpose(1, 2).repeat(1, E, 1, 1)
        v = self.v_proj(x_BLD).reshape(kv_shape).transpose(1, 2).repeat(1, E, 1, 1)
        h = stick_breaking_attention(q, k, v, attention_mask)  # [B, E*H, L, C]
        h_BELA = h.reshape(B, E, H, L, C).permute(0, 1, 3, 2, 4).reshape(B, E, L, H * C)
        y = torch.einsum("bela,ead,ble->bld", h_BELA, self.o_proj, w_BLE.to(h_BELA.dtype))
        return y, plan


MOLM_700M_8B = register_preset(
    Preset(
        name="molm_700m_8b",
        router="moduleformer",
        options={"k": 2, "gating_size": 256, "aux_loss": "mi"},
        num_experts=32,
        loss_coefficients={"mutual_information": 0.0},
        papers=("moduleformer",),
        description=(
            "ModuleFormer MoLM-700M-8B (Shen et al. 2023, arXiv 2306.04640), FFN modules: 32 experts of "
            "width 2048, top-2 raw probabilities from a 256-unit GELU gate, mutual-information loss; its "
            "attention modules (16 one-head experts, top-2) are ModuleFormerAttention's defaults."
        ),
        deviations=(
            "Values from the released config.json; its aux_loss_weight is 0 (the pretraining weight is "
            "not published), so the preset weights the MI loss 0. Exact GELU experts instead of gelu_new."
        ),
    )
)
