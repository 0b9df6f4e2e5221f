"""Tiny, randomly initialised transformers MoE blocks (no downloads) for the interop tests."""

from __future__ import annotations

import importlib

import torch

H, I, E = 16, 32, 8

#: family -> (module, block class, config class, config kwargs)
BLOCKS: dict[str, tuple[str, str, str, dict]] = {
    "mixtral": (
        "mixtral",
        "MixtralSparseMoeBlock",
        "MixtralConfig",
        {"hidden_size": H, "intermediate_size": I, "num_local_experts": E, "num_experts_per_tok": 2},
    ),
    "qwen2_moe": (
        "qwen2_moe",
        "Qwen2MoeSparseMoeBlock",
        "Qwen2MoeConfig",
        {
            "hidden_size": H,
            "moe_intermediate_size": I,
            "shared_expert_intermediate_size": 48,
            "num_experts": E,
            "num_experts_per_tok": 3,
            "norm_topk_prob": False,
        },
    ),
    "qwen3_moe": (
        "qwen3_moe",
        "Qwen3MoeSparseMoeBlock",
        "Qwen3MoeConfig",
        {
            "hidden_size": H,
            "moe_intermediate_size": I,
            "num_experts": E,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
        },
    ),
    "olmoe": (
        "olmoe",
        "OlmoeSparseMoeBlock",
        "OlmoeConfig",
        {"hidden_size": H, "intermediate_size": I, "num_experts": E, "num_experts_per_tok": 3},
    ),
    "deepseek_v2": (
        "deepseek_v2",
        "DeepseekV2Moe",
        "DeepseekV2Config",
        {
            "hidden_size": H,
            "moe_intermediate_size": I,
            "n_routed_experts": E,
            "num_experts_per_tok": 3,
            "n_shared_experts": 2,
            "topk_method": "group_limited_greedy",
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 1.5,
        },
    ),
    "deepseek_v3": (
        "deepseek_v3",
        "DeepseekV3MoE",
        "DeepseekV3Config",
        {
            "hidden_size": H,
            "moe_intermediate_size": I,
            "n_routed_experts": E,
            "num_experts_per_tok": 3,
            "n_shared_experts": 1,
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
        },
    ),
    "dbrx": (
        "dbrx",
        "DbrxFFN",
        "DbrxConfig",
        {
            "d_model": H,
            "n_heads": 2,
            "ffn_config": {"ffn_hidden_size": I, "moe_num_experts": E, "moe_top_k": 2, "hidden_size": H},
        },
    ),
    "jetmoe": (
        "jetmoe",
        "JetMoeMoE",
        "JetMoeConfig",
        {"hidden_size": H, "intermediate_size": I, "num_local_experts": E, "num_experts_per_tok": 2},
    ),
    "jamba": (
        "jamba",
        "JambaSparseMoeBlock",
        "JambaConfig",
        {"hidden_size": H, "intermediate_size": I, "num_experts": E, "num_experts_per_tok": 2},
    ),
    "switch_transformers": (
        "switch_transformers",
        "SwitchTransformersSparseMLP",
        "SwitchTransformersConfig",
        {
            "d_model": H,
            "d_ff": I,
            "num_heads": 2,
            "d_kv": 8,
            "num_experts": 4,
            "expert_capacity": 3,
            "router_bias": True,
            "router_jitter_noise": 0.0,
            "dropout_rate": 0.0,
        },
    ),
    "gpt_oss": (
        "gpt_oss",
        "GptOssMLP",
        "GptOssConfig",
        {"hidden_size": H, "intermediate_size": I, "num_local_experts": E, "num_experts_per_tok": 2},
    ),
}

#: families whose experts go through transformers' ``experts_implementation`` interface
PACKED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "jamba", "gpt_oss")
_HEADS = {"num_attention_heads": 2, "num_key_value_heads": 2}


def config(family: str, **overrides):
    mod, _, cfg_name, kw = BLOCKS[family]
    m = importlib.import_module(f"transformers.models.{mod}.configuration_{mod}")
    extra = {} if family in ("dbrx", "switch_transformers") else dict(_HEADS)
    return getattr(m, cfg_name)(**{**extra, **kw, **overrides})


def make_block(family: str, experts_implementation: str | None = "eager", seed: int = 0, std: float = 0.2):
    """A block of ``family`` with every parameter and buffer drawn at random (seeded)."""
    mod, cls_name, _, _ = BLOCKS[family]
    cfg = config(family)
    if experts_implementation is not None:
        cfg._experts_implementation = experts_implementation
    cls = getattr(importlib.import_module(f"transformers.models.{mod}.modeling_{mod}"), cls_name)
    torch.manual_seed(seed)
    block = cls(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, std)
        for b in block.buffers():
            b.normal_(0.0, 0.1)
    return block.eval()


def block_output(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out
