"""The arena's model: a small byte-level decoder-only transformer whose FFNs are ``impls.MoELayer``.

Pre-norm blocks (LayerNorm, causal multi-head attention through ``scaled_dot_product_attention``,
LayerNorm, FFN), learned positions, tied input and output embeddings. The FFN of every block is an
MoE layer built from a router or preset name, or a dense GELU MLP for the baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import impls

VOCAB = 256  # bytes


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 128
    num_experts: int = 8
    d_hidden: int = 256
    """Hidden width of each routed expert (and the unit of the dense baselines' width)."""


class DenseFFN(nn.Module):
    """``W2 gelu(W1 x)``, no biases (the dense baselines)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x, padding_mask=None, **inputs):
        return self.w2(F.gelu(self.w1(x))), None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.n_heads = cfg.n_heads
        self.ffn = ffn

    def forward(self, x: torch.Tensor, inputs: dict[str, torch.Tensor]):
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_heads, D // self.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        y, plan = self.ffn(self.ln2(x), **inputs)
        return x + y, plan


class TinyLM(nn.Module):
    """Byte-level LM; ``ffn`` builds each block's FFN (``lambda: MoELayer(...)`` or a dense MLP)."""

    def __init__(self, cfg: ModelConfig, ffn):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(VOCAB, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg, ffn()) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.01)

    def forward(self, ids_BL: torch.Tensor, inputs: dict[str, torch.Tensor]):
        x = self.embed(ids_BL) + self.pos[: ids_BL.shape[1]]
        plans = []
        for block in self.blocks:
            x, plan = block(x, inputs)
            plans.append(plan)
        return self.ln_f(x) @ self.embed.weight.T, plans


def moe_layers(model: TinyLM) -> list[impls.MoELayer]:
    return [b.ffn for b in model.blocks if isinstance(b.ffn, impls.MoELayer)]


def expert_weights(plan) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w [T, E], scores [T, E])``: weight per token and expert, and the router's scores, flattened."""
    if isinstance(plan, impls.RoutingPlan):
        T, E = plan.scores_TE.shape
        keep = plan.keep_TK & plan.selected_TK
        w = torch.zeros(T, E, device=plan.scores_TE.device)
        w = w.scatter_add_(1, plan.expert_ids_TK.clamp_min(0), plan.weights_TK * keep)
        return w, plan.scores_TE
    if isinstance(plan, impls.SlotPlan):
        w = plan.expert_weights_BLE.reshape(-1, plan.num_experts)
        return w, w
    if isinstance(plan, impls.MergePlan):
        w = plan.token_weights()
        s = plan.scores_BGE.repeat_interleave(plan.group_length, 1)[:, : plan.seq_len]
        return w.reshape(-1, plan.num_experts), s.reshape(-1, plan.num_experts)
    raise TypeError(f"unknown plan {type(plan).__name__}")
