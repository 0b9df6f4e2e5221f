"""Hugging Face ``transformers`` interop: load MoE blocks, write them back, swap their routing.

Needs the optional extra ``moe-atlas[hf]`` (``transformers`` 5.x; tested with the versions named
in ``SUPPORTED_TRANSFORMERS``). Nothing here downloads anything: it works on blocks and models
the caller already has.

* ``from_hf(block)`` builds the ``impls.MoELayer`` matching a transformers MoE block (router
  options, expert activation, shared experts and their gate, expert and layer biases,
  DeepSeek-V3's score-correction bias, Switch's per-sequence capacity) and copies every weight
  into it. In float32 its output, routing and gradients equal the block's.
* ``to_hf(layer, block)`` copies a layer's weights back into a block of the same shape.
* ``swap_routers(model, router, **options)`` replaces the routing of every MoE block of a model
  with any ``impls`` router and returns a ``SwappedRouters`` handle: what was replaced, the plans
  of the last forward, the routers' auxiliary losses (``handle.aux_loss()``) and their
  between-step updates (``handle.step()``).

Supported blocks (``SUPPORTED_BLOCKS``): ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock``,
``Qwen3MoeSparseMoeBlock``, ``OlmoeSparseMoeBlock``, ``DeepseekV2Moe``, ``DeepseekV3MoE``,
``DbrxFFN``, ``JetMoeMoE``, ``JambaSparseMoeBlock``, ``SwitchTransformersSparseMLP`` and
``GptOssMLP``.

Documented differences (where a block and its layer are *not* the same function):

* **Training noise.** Mixtral's and DBRX's input jitter multiplies the hidden states (in place)
  before both the router and the experts; the layer's jitter (``jitter_eps``, set to the block's
  value) reaches the router only. Switch's jitter reaches its router only, as here. Random draws
  differ, so training-mode outputs with jitter are equal in distribution, not bit for bit; in
  ``eval()`` (or with the jitter at 0) they are equal.
* **Expert dropout.** Switch's experts apply dropout between their two projections in training;
  the layer's experts have none (equal in ``eval()``).
* **Padding.** Blocks take no padding mask and route (and bias) every position; the layer, given a
  ``padding_mask``, routes only real tokens, takes no capacity for padding and returns zero rows
  there (JetMoE's output bias included).
* **Slot order.** DeepSeek's blocks use an unsorted top-k; the layer's slots are sorted by score.
  The chosen sets, their weights and the output are equal.
* **Auxiliary losses.** transformers' ``load_balancing_loss_func`` (Mixtral, Qwen, OLMoE, Jamba,
  DBRX, JetMoE, gpt-oss) reports ``k`` times the Switch value; ``plan.losses["load_balance"]`` is
  the Switch convention (1.0 when balanced, for every ``k``), so the models' ``router_aux_loss_coef``
  corresponds to a ``load_balance`` weight ``k`` times larger.
* **gpt-oss** stores its gate and linear columns interleaved (``[g0, u0, g1, u1, ...]``);
  ``from_hf`` de-interleaves them into the layer's ``[gate | up]`` layout and ``to_hf`` re-interleaves.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from impls.layer import MoELayer
from impls.plan import RoutingPlan
from impls.registry import PRESETS, build_router
from impls.router import Router, step_routers

log = logging.getLogger(__name__)

#: the ``transformers`` versions the test suite runs against (the ``hf`` extra's range)
SUPPORTED_TRANSFORMERS = ">=5.21,<6"

__all__ = [
    "SUPPORTED_BLOCKS",
    "SUPPORTED_TRANSFORMERS",
    "HFMoEBlock",
    "SwappedRouters",
    "UnsupportedBlockError",
    "find_moe_blocks",
    "from_hf",
    "swap_routers",
    "to_hf",
]


class UnsupportedBlockError(TypeError):
    """The module is not a transformers MoE block this module knows."""


# ----------------------------------------------------------------------------- activations

_PROBE = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
_ELEMENTWISE = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def _activation_name(act: Callable[[torch.Tensor], torch.Tensor], where: str) -> str:
    """Which of SiLU, exact GELU and ReLU ``act`` computes, found by evaluating it (so any class
    transformers uses for it is recognized); anything else is refused by name."""
    with torch.no_grad():
        got = act(_PROBE)
        for name, fn in _ELEMENTWISE.items():
            if torch.allclose(got, fn(_PROBE), atol=1e-9, rtol=0):
                return name
    raise NotImplementedError(
        f"{where}: activation {act!r} is not SiLU, exact GELU or ReLU; the layer's experts support "
        "swiglu, geglu, gelu, relu and gpt_oss_swiglu"
    )


def _gated(act_name: str, where: str) -> str:
    table = {"silu": "swiglu", "gelu": "geglu"}
    if act_name not in table:
        raise NotImplementedError(f"{where}: a gated expert with {act_name} has no layer activation")
    return table[act_name]


# ----------------------------------------------------------------------------- weight layouts


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"shape mismatch: {tuple(src.shape)} into {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src.to(dtype=dst.dtype, device=dst.device))


def _interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[g0, u0, g1, u1, ...]`` along the last axis (gpt-oss' layout)."""
    return torch.stack([gate, up], dim=-1).flatten(-2)


def _packed_in(gate_up_EID: torch.Tensor) -> torch.Tensor:
    """transformers' ``gate_up_proj [E, 2I, H]`` as the layer's ``w_in [E, H, 2I]`` (a transpose)."""
    return gate_up_EID.transpose(1, 2)


def _mlp_in(mlp: nn.Module) -> torch.Tensor:
    """A dense gated MLP's (``gate_proj``, ``up_proj``) as ``[1, H, 2I]``."""
    return torch.cat([mlp.gate_proj.weight.t(), mlp.up_proj.weight.t()], dim=1)[None]


@dataclass
class _Spec:
    """How one block family maps onto an ``MoELayer``."""

    family: str
    classes: tuple[str, ...]
    preset: str
    build: Callable[[nn.Module], MoELayer]
    copy_in: Callable[[MoELayer, nn.Module], None]
    copy_out: Callable[[MoELayer, nn.Module], None]
    router_attr: str
    d_model: Callable[[nn.Module], int]
    num_experts: Callable[[nn.Module], int]
    top_k: Callable[[nn.Module], int]
    gate_weight: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None]]
    notes: tuple[str, ...] = field(default_factory=tuple)


def _layer(block: nn.Module, d_model, d_hidden, preset, dtype, **options) -> MoELayer:
    device = next(block.parameters()).device
    layer = MoELayer(d_model, d_hidden, router=preset, dtype=dtype, device=device, **options)
    layer.train(block.training)
    return layer


# --- packed experts: gate_up_proj [E, 2I, H], down_proj [E, H, I] (Mixtral, Qwen, OLMoE, DeepSeek, Jamba)


def _packed_activation(experts: nn.Module, where: str) -> str:
    return _gated(_activation_name(experts.act_fn, where), where)


def _copy_packed_experts_in(layer: MoELayer, experts: nn.Module) -> None:
    _copy(layer.experts.w_in_EDF, _packed_in(experts.gate_up_proj))
    _copy(layer.experts.w_out_EFD, experts.down_proj.transpose(1, 2))


def _copy_packed_experts_out(layer: MoELayer, experts: nn.Module) -> None:
    _copy(experts.gate_up_proj, layer.experts.w_in_EDF.transpose(1, 2))
    _copy(experts.down_proj, layer.experts.w_out_EFD.transpose(1, 2))


def _copy_shared_in(layer: MoELayer, mlp: nn.Module, gate: nn.Linear | None = None) -> None:
    assert layer.shared is not None
    _copy(layer.shared.mlp.w_in_EDF, _mlp_in(mlp))
    _copy(layer.shared.mlp.w_out_EFD, mlp.down_proj.weight.t()[None])
    if gate is not None:
        assert layer.shared.gate is not None
        _copy(layer.shared.gate.weight, gate.weight)


def _copy_shared_out(layer: MoELayer, mlp: nn.Module, gate: nn.Linear | None = None) -> None:
    assert layer.shared is not None
    w_in = layer.shared.mlp.w_in_EDF[0]
    half = w_in.shape[1] // 2
    _copy(mlp.gate_proj.weight, w_in[:, :half].t())
    _copy(mlp.up_proj.weight, w_in[:, half:].t())
    _copy(mlp.down_proj.weight, layer.shared.mlp.w_out_EFD[0].t())
    if gate is not None:
        assert layer.shared.gate is not None
        _copy(gate.weight, layer.shared.gate.weight)


def _shared_width(mlp: nn.Module) -> int:
    return mlp.gate_proj.weight.shape[0]


def _check_shared_activation(mlp: nn.Module, activation: str, where: str) -> None:
    got = _gated(_activation_name(mlp.act_fn, f"{where}'s shared expert"), where)
    if got != activation:
        raise NotImplementedError(
            f"{where}: shared expert activation {got} differs from the experts' {activation}"
        )


def _topk_family(
    family: str,
    classes: tuple[str, ...],
    preset: str,
    *,
    router_attr: str = "gate",
    normalize: Callable[[nn.Module], bool],
    shared: str | None = None,
) -> _Spec:
    """Blocks with a softmax top-k router ``weight [E, H]`` and packed experts."""

    def build(block: nn.Module) -> MoELayer:
        router, experts = getattr(block, router_attr), block.experts
        E, I, H = (
            experts.gate_up_proj.shape[0],
            experts.gate_up_proj.shape[1] // 2,
            experts.gate_up_proj.shape[2],
        )
        where = type(block).__name__
        act = _packed_activation(experts, where)
        opts: dict[str, Any] = {"num_experts": E, "k": router.top_k, "normalize": normalize(block)}
        jitter = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        opts["jitter_eps"] = jitter
        if family == "qwen3_moe":
            opts["global_balance"] = False  # transformers' Qwen3 block balances per micro-batch
        layer_opts: dict[str, Any] = {"activation": act, "num_shared_experts": 0}
        if shared == "qwen2":
            _check_shared_activation(block.shared_expert, act, where)
            layer_opts.update(
                num_shared_experts=1,
                d_hidden_shared=_shared_width(block.shared_expert),
                shared_expert_gate=True,
            )
        layer = _layer(block, H, I, preset, experts.gate_up_proj.dtype, **layer_opts, **opts)
        copy_in(layer, block)
        return layer

    def copy_in(layer: MoELayer, block: nn.Module) -> None:
        _copy(layer.router.gate.weight, getattr(block, router_attr).weight)
        _copy_packed_experts_in(layer, block.experts)
        if shared == "qwen2":
            _copy_shared_in(layer, block.shared_expert, block.shared_expert_gate)

    def copy_out(layer: MoELayer, block: nn.Module) -> None:
        _copy(getattr(block, router_attr).weight, layer.router.gate.weight)
        _copy_packed_experts_out(layer, block.experts)
        if shared == "qwen2":
            _copy_shared_out(layer, block.shared_expert, block.shared_expert_gate)

    return _Spec(
        family=family,
        classes=classes,
        preset=preset,
        build=build,
        copy_in=copy_in,
        copy_out=copy_out,
        router_attr=router_attr,
        d_model=lambda b: getattr(b, router_attr).weight.shape[1],
        num_experts=lambda b: getattr(b, router_attr).weight.shape[0],
        top_k=lambda b: getattr(b, router_attr).top_k,
        gate_weight=lambda b: (getattr(b, router_attr).weight, None),
    )


def _deepseek_family(family: str, classes: tuple[str, ...], preset: str) -> _Spec:
    def options(block: nn.Module) -> dict[str, Any]:
        g = block.gate
        E = g.weight.shape[0]
        n_group, topk_group = int(g.num_group or 1), int(g.topk_group or 1)
        opts: dict[str, Any] = {
            "num_experts": E,
            "k": g.top_k,
            "routed_scaling_factor": float(g.routed_scaling_factor),
        }
        if family == "deepseek_v2":
            method = g.topk_method
            if method not in ("greedy", "group_limited_greedy"):
                raise NotImplementedError(f"DeepseekV2Moe: topk_method={method!r} is not supported")
            grouped = method == "group_limited_greedy"
            opts.update(
                score_func="softmax",
                normalize=False,
                n_group=n_group if grouped else 1,
                topk_group=topk_group if grouped else 1,
                group_score="max",
            )
        else:
            opts.update(
                score_func="sigmoid",
                normalize=bool(g.norm_topk_prob),
                n_group=n_group,
                topk_group=topk_group,
                group_score="top2_sum",
                aux_free_bias=True,
            )
        return opts

    def build(block: nn.Module) -> MoELayer:
        experts = block.experts
        I, H = experts.gate_up_proj.shape[1] // 2, experts.gate_up_proj.shape[2]
        where = type(block).__name__
        act = _packed_activation(experts, where)
        _check_shared_activation(block.shared_experts, act, where)
        n_shared = int(getattr(block.config, "n_shared_experts", None) or 1)
        width = _shared_width(block.shared_experts)
        if width % n_shared:
            n_shared = 1
        layer = _layer(
            block,
            H,
            I,
            preset,
            experts.gate_up_proj.dtype,
            activation=act,
            num_shared_experts=n_shared,
            d_hidden_shared=width // n_shared,
            **options(block),
        )
        copy_in(layer, block)
        return layer

    def copy_in(layer: MoELayer, block: nn.Module) -> None:
        _copy(layer.router.gate.weight, block.gate.weight)
        if family == "deepseek_v3":
            _copy(layer.router.expert_bias, block.gate.e_score_correction_bias)
        _copy_packed_experts_in(layer, block.experts)
        _copy_shared_in(layer, block.shared_experts)

    def copy_out(layer: MoELayer, block: nn.Module) -> None:
        _copy(block.gate.weight, layer.router.gate.weight)
        if family == "deepseek_v3":
            _copy(block.gate.e_score_correction_bias, layer.router.expert_bias)
        _copy_packed_experts_out(layer, block.experts)
        _copy_shared_out(layer, block.shared_experts)

    return _Spec(
        family=family,
        classes=classes,
        preset=preset,
        build=build,
        copy_in=copy_in,
        copy_out=copy_out,
        router_attr="gate",
        d_model=lambda b: b.gate.weight.shape[1],
        num_experts=lambda b: b.gate.weight.shape[0],
        top_k=lambda b: b.gate.top_k,
        gate_weight=lambda b: (b.gate.weight, None),
        notes=("unsorted top-k in transformers; the layer sorts its slots (same sets and output)",),
    )


# --- DBRX: router.layer Linear; experts.mlp.{w1, v1, w2} each [E * F, H]


def _dbrx_spec() -> _Spec:
    def build(block: nn.Module) -> MoELayer:
        mlp = block.experts.mlp
        E, F_, H = mlp.moe_num_experts, mlp.ffn_hidden_size, mlp.hidden_size
        act = _gated(_activation_name(mlp.activation_fn, "DbrxFFN"), "DbrxFFN")
        p = block.moe_normalize_expert_weights
        opts: dict[str, Any] = {"num_experts": E, "k": block.top_k}
        opts.update({"normalize": False} if p is None else {"normalize": True, "norm_p": float(p)})
        jitter = block.router.moe_jitter_eps
        opts["jitter_eps"] = float(jitter or 0.0)
        layer = _layer(block, H, F_, "dbrx", mlp.w1.dtype, activation=act, **opts)
        copy_in(layer, block)
        return layer

    def split(w: torch.Tensor, E: int) -> torch.Tensor:
        return w.view(E, -1, w.shape[-1])  # [E, F, H]

    def copy_in(layer: MoELayer, block: nn.Module) -> None:
        mlp, E = block.experts.mlp, block.experts.mlp.moe_num_experts
        _copy(layer.router.gate.weight, block.router.layer.weight)
        w_in = torch.cat([split(mlp.w1, E).transpose(1, 2), split(mlp.v1, E).transpose(1, 2)], dim=2)
        _copy(layer.experts.w_in_EDF, w_in)
        _copy(layer.experts.w_out_EFD, split(mlp.w2, E))

    def copy_out(layer: MoELayer, block: nn.Module) -> None:
        mlp, E = block.experts.mlp, block.experts.mlp.moe_num_experts
        _copy(block.router.layer.weight, layer.router.gate.weight)
        w_in = layer.experts.w_in_EDF
        half = w_in.shape[2] // 2
        _copy(mlp.w1, w_in[:, :, :half].transpose(1, 2).reshape(E * half, -1))
        _copy(mlp.v1, w_in[:, :, half:].transpose(1, 2).reshape(E * half, -1))
        _copy(mlp.w2, layer.experts.w_out_EFD.reshape(-1, layer.d_model))

    return _Spec(
        family="dbrx",
        classes=("DbrxFFN",),
        preset="dbrx",
        build=build,
        copy_in=copy_in,
        copy_out=copy_out,
        router_attr="router",
        d_model=lambda b: b.router.layer.weight.shape[1],
        num_experts=lambda b: b.router.layer.weight.shape[0],
        top_k=lambda b: b.top_k,
        gate_weight=lambda b: (b.router.layer.weight, None),
    )


# --- JetMoE: router.layer Linear; input_linear.weight [E, 2F, H], output_linear.weight [E, H, F]; bias [H]


def _jetmoe_spec() -> _Spec:
    def build(block: nn.Module) -> MoELayer:
        w_in = block.input_linear.weight
        E, F_, H = w_in.shape[0], w_in.shape[1] // 2, w_in.shape[2]
        act = _gated(_activation_name(block.activation, "JetMoeMoE"), "JetMoeMoE")
        layer = _layer(
            block,
            H,
            F_,
            "jetmoe",
            w_in.dtype,
            activation=act,
            output_bias=True,
            num_experts=E,
            k=block.router.top_k,
        )
        copy_in(layer, block)
        return layer

    def copy_in(layer: MoELayer, block: nn.Module) -> None:
        _copy(layer.router.gate.weight, block.router.layer.weight)
        _copy(layer.experts.w_in_EDF, block.input_linear.weight.transpose(1, 2))
        _copy(layer.experts.w_out_EFD, block.output_linear.weight.transpose(1, 2))
        assert layer.output_bias is not None
        _copy(layer.output_bias, block.bias)

    def copy_out(layer: MoELayer, block: nn.Module) -> None:
        _copy(block.router.layer.weight, layer.router.gate.weight)
        _copy(block.input_linear.weight, layer.experts.w_in_EDF.transpose(1, 2))
        _copy(block.output_linear.weight, layer.experts.w_out_EFD.transpose(1, 2))
        assert layer.output_bias is not None
        _copy(block.bias, layer.output_bias)

    return _Spec(
        family="jetmoe",
        classes=("JetMoeMoE",),
        preset="jetmoe",
        build=build,
        copy_in=copy_in,
        copy_out=copy_out,
        router_attr="router",
        d_model=lambda b: b.router.layer.weight.shape[1],
        num_experts=lambda b: b.router.layer.weight.shape[0],
        top_k=lambda b: b.router.top_k,
        gate_weight=lambda b: (b.router.layer.weight, None),
    )


# --- Switch Transformers: router.classifier Linear (optional bias); experts.expert_i.{wi, wo}


def _switch_spec() -> _Spec:
    def experts_of(block: nn.Module) -> list[nn.Module]:
        return [block.experts[f"expert_{i}"] for i in range(block.router.num_experts)]

    def build(block: nn.Module) -> MoELayer:
        ex = experts_of(block)
        F_, H = ex[0].wi.weight.shape
        act = _activation_name(ex[0].act, "SwitchTransformersSparseMLP")
        r = block.router
        layer = _layer(
            block,
            H,
            F_,
            "switch_base",
            ex[0].wi.weight.dtype,
            activation=act,
            num_experts=r.num_experts,
            k=1,
            router_bias=r.classifier.bias is not None,
            jitter_eps=float(r.jitter_noise or 0.0),
            capacity_factor=None,
            eval_capacity_factor=None,
            expert_capacity=int(r.expert_capacity),
            capacity_groups="sequence",
        )
        copy_in(layer, block)
        return layer

    def copy_in(layer: MoELayer, block: nn.Module) -> None:
        r = block.router.classifier
        _copy(layer.router.gate.weight, r.weight)
        if r.bias is not None:
            _copy(layer.router.gate.bias, r.bias)
        ex = experts_of(block)
        _copy(layer.experts.w_in_EDF, torch.stack([e.wi.weight.t() for e in ex]))
        _copy(layer.experts.w_out_EFD, torch.stack([e.wo.weight.t() for e in ex]))

    def copy_out(layer: MoELayer, block: nn.Module) -> None:
        r = block.router.classifier
        _copy(r.weight, layer.router.gate.weight)
        if r.bias is not None:
            _copy(r.bias, layer.router.gate.bias)
        for i, e in enumerate(experts_of(block)):
            _copy(e.wi.weight, layer.experts.w_in_EDF[i].t())
            _copy(e.wo.weight, layer.experts.w_out_EFD[i].t())

    return _Spec(
        family="switch_transformers",
        classes=("SwitchTransformersSparseMLP",),
        preset="switch_base",
        build=build,
        copy_in=copy_in,
        copy_out=copy_out,
        router_attr="router",
        d_model=lambda b: b.router.classifier.weight.shape[1],
        num_experts=lambda b: b.router.num_experts,
        top_k=lambda b: 1,
        gate_weight=lambda b: (b.router.classifier.weight, b.router.classifier.bias),
        notes=("expert dropout (training only) is not modelled",),
    )


# --- gpt-oss: router weight [E, H] + bias; gate_up_proj [E, H, 2F] interleaved + bias; down + bias


def _gpt_oss_spec() -> _Spec:
    def build(block: nn.Module) -> MoELayer:
        ex = block.experts
        E, H, F2 = ex.gate_up_proj.shape
        preset = "gpt_oss_20b" if E == 32 else "gpt_oss_120b"
        layer = _layer(
            block,
            H,
            F2 // 2,
            preset,
            ex.gate_up_proj.dtype,
            activation="gpt_oss_swiglu",
            expert_bias=True,
            num_experts=E,
            k=block.router.top_k,
        )
        layer.experts.swiglu_alpha, layer.experts.swiglu_limit = float(ex.alpha), float(ex.limit)
        copy_in(layer, block)
        return layer

    def copy_in(layer: MoELayer, block: nn.Module) -> None:
        ex, r = block.experts, block.router
        _copy(layer.router.gate.weight, r.weight)
        _copy(layer.router.gate.bias, r.bias)
        gu, gub = ex.gate_up_proj, ex.gate_up_proj_bias
        _copy(layer.experts.w_in_EDF, torch.cat([gu[..., ::2], gu[..., 1::2]], dim=-1))
        _copy(layer.experts.b_in_EF, torch.cat([gub[..., ::2], gub[..., 1::2]], dim=-1))
        _copy(layer.experts.w_out_EFD, ex.down_proj)
        _copy(layer.experts.b_out_ED, ex.down_proj_bias)

    def copy_out(layer: MoELayer, block: nn.Module) -> None:
        ex, r = block.experts, block.router
        _copy(r.weight, layer.router.gate.weight)
        _copy(r.bias, layer.router.gate.bias)
        w, b = layer.experts.w_in_EDF, layer.experts.b_in_EF
        half = w.shape[-1] // 2
        _copy(ex.gate_up_proj, _interleave(w[..., :half], w[..., half:]))
        _copy(ex.gate_up_proj_bias, _interleave(b[..., :half], b[..., half:]))
        _copy(ex.down_proj, layer.experts.w_out_EFD)
        _copy(ex.down_proj_bias, layer.experts.b_out_ED)
        ex.alpha, ex.limit = layer.experts.swiglu_alpha, layer.experts.swiglu_limit

    return _Spec(
        family="gpt_oss",
        classes=("GptOssMLP",),
        preset="gpt_oss_20b (32 experts) or gpt_oss_120b",
        build=build,
        copy_in=copy_in,
        copy_out=copy_out,
        router_attr="router",
        d_model=lambda b: b.router.weight.shape[1],
        num_experts=lambda b: b.router.weight.shape[0],
        top_k=lambda b: b.router.top_k,
        gate_weight=lambda b: (b.router.weight, b.router.bias),
        notes=("the block returns (hidden_states, router_scores)",),
    )


_SPECS: tuple[_Spec, ...] = (
    _topk_family("mixtral", ("MixtralSparseMoeBlock",), "mixtral_8x7b", normalize=lambda b: True),
    _topk_family(
        "qwen2_moe",
        ("Qwen2MoeSparseMoeBlock",),
        "qwen1_5_moe",
        normalize=lambda b: bool(b.gate.norm_topk_prob),
        shared="qwen2",
    ),
    _topk_family(
        "qwen3_moe",
        ("Qwen3MoeSparseMoeBlock",),
        "qwen3_30b_a3b",
        normalize=lambda b: bool(b.gate.norm_topk_prob),
    ),
    _topk_family(
        "olmoe", ("OlmoeSparseMoeBlock",), "olmoe_1b_7b", normalize=lambda b: bool(b.gate.norm_topk_prob)
    ),
    _topk_family("jamba", ("JambaSparseMoeBlock",), "jamba", router_attr="router", normalize=lambda b: False),
    _deepseek_family("deepseek_v2", ("DeepseekV2Moe",), "deepseek_v2"),
    _deepseek_family("deepseek_v3", ("DeepseekV3MoE",), "deepseek_v3"),
    _dbrx_spec(),
    _jetmoe_spec(),
    _switch_spec(),
    _gpt_oss_spec(),
)
#: transformers block class name -> family
SUPPORTED_BLOCKS: Mapping[str, str] = types.MappingProxyType(
    {name: s.family for s in _SPECS for name in s.classes}
)


def _check_version() -> None:
    """Refuse transformers releases older than the tested range, by name (their blocks differ)."""
    import transformers

    parts = transformers.__version__.split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return
    if (major, minor) < (5, 21):
        raise RuntimeError(
            f"impls.hf supports transformers {SUPPORTED_TRANSFORMERS}; {transformers.__version__} is "
            "installed (its MoE blocks are laid out differently): pip install 'moe-atlas[hf]'"
        )


def _spec_of(block: nn.Module) -> _Spec:
    for cls in type(block).__mro__:
        for s in _SPECS:
            if cls.__name__ in s.classes:
                return s
    known = ", ".join(sorted(SUPPORTED_BLOCKS))
    raise UnsupportedBlockError(
        f"{type(block).__name__} is not a supported transformers MoE block; known: {known}"
    )


# ----------------------------------------------------------------------------- from_hf / to_hf


def from_hf(block: nn.Module) -> MoELayer:
    """The ``MoELayer`` equal to a transformers MoE block, with every weight copied from it.

    The layer is built from the block family's preset (``mixtral_8x7b``, ``qwen1_5_moe``,
    ``deepseek_v3``, ...) with the block's own sizes and options (experts, ``k``, normalization,
    groups, scaling factor, capacity, activation, shared experts, biases) and is in the block's
    train/eval mode, on its device, with expert weights in its dtype (the router stays float32).
    Call it as ``layer(hidden_states)`` -> ``(mixture, plan)``: the mixture equals the block's
    output (for gpt-oss, the first element of its tuple). See the module docstring for the
    documented differences.
    """
    _check_version()
    spec = _spec_of(block)
    layer = spec.build(block)
    log.debug("from_hf: %s -> %s", type(block).__name__, layer)
    return layer


def to_hf(layer: MoELayer, block: nn.Module) -> nn.Module:
    """Copy ``layer``'s weights into ``block`` (same family and shapes); returns the block.

    The inverse of ``from_hf``: ``to_hf(from_hf(b), b2)`` makes ``b2`` equal to ``b``. Raises
    ``ValueError`` naming the mismatch when the shapes differ.
    """
    spec = _spec_of(block)
    if layer.num_experts != spec.num_experts(block) or layer.d_model != spec.d_model(block):
        raise ValueError(
            f"to_hf: layer has {layer.num_experts} experts of width {layer.d_model}, the "
            f"{type(block).__name__} has {spec.num_experts(block)} of width {spec.d_model(block)}"
        )
    try:
        spec.copy_out(layer, block)
    except (ValueError, AttributeError, AssertionError) as exc:
        raise ValueError(f"to_hf: cannot copy {layer!r} into {type(block).__name__}: {exc}") from None
    return block


def find_moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: block}`` of every supported MoE block inside ``model``, in module order."""
    out = {}
    for name, m in model.named_modules():
        try:
            _spec_of(m)
        except UnsupportedBlockError:
            continue
        out[name] = m
    return out


# ----------------------------------------------------------------------------- swap_routers


class _State:
    """What the replaced routers of one model share: the token mask of the current batch."""

    def __init__(self) -> None:
        self.token_mask: torch.Tensor | None = None


class _RouterShim(nn.Module):
    """Stands where a block's router was; routes with an ``impls`` router and answers in the
    block's own format, so the block's forward and its experts stay transformers' own.

    ``fmt``: ``"triple"`` ``(logits, weights [T, K], ids [T, K])`` (Mixtral, Qwen, OLMoE,
    DeepSeek, Jamba, gpt-oss), ``"logits"`` (DBRX: the block then asks ``route_tokens_to_experts``),
    ``"jetmoe"`` (JetMoE's sorted 5-tuple) or ``"switch"`` (one-hot dispatch ``[T, K, E]``).
    Slots the plan does not compute (dropped by a capacity, empty for variable-k routers) are
    handed to expert 0 with weight exactly 0, so they add nothing and pass no gradient.
    """

    def __init__(self, router: Router, fmt: str, state: _State):
        super().__init__()
        self.router = router
        self.fmt = fmt
        self._state = state
        self.plan: RoutingPlan | None = None
        self.sequence_length: int | None = None

    def route(self, hidden_states: torch.Tensor) -> tuple[RoutingPlan, torch.Tensor, torch.Tensor]:
        D = self.router.d_model
        x_TD = hidden_states.reshape(-1, D)
        seq = hidden_states.shape[1] if hidden_states.dim() == 3 else self.sequence_length
        if seq is not None and (seq <= 0 or x_TD.shape[0] % seq):
            seq = None
        mask = self._state.token_mask
        mask_T = mask.reshape(-1) if mask is not None and mask.numel() == x_TD.shape[0] else None
        plan = self.router(x_TD, mask_T, sequence_length=seq)
        self.plan = plan
        keep = plan.keep_TK & plan.selected_TK
        ids = torch.where(keep, plan.expert_ids_TK, 0)
        w = torch.where(keep, plan.weights_TK, plan.weights_TK.new_zeros(())).to(hidden_states.dtype)
        return plan, ids, w

    def forward(self, hidden_states: torch.Tensor):
        plan, ids, w = self.route(hidden_states)
        if self.fmt == "triple":
            return plan.logits_TE.to(hidden_states.dtype), w, ids
        if self.fmt == "logits":
            self._pending = (w, ids)
            return plan.logits_TE.to(hidden_states.dtype)
        if self.fmt == "switch":
            onehot = F.one_hot(ids, self.router.num_experts) * (w != 0)[..., None]
            return onehot, w, plan.logits_TE
        if self.fmt == "jetmoe":
            K = ids.shape[1]
            flat = ids.reshape(-1)
            index_sorted = torch.argsort(flat, stable=True)
            expert_size = torch.bincount(flat, minlength=self.router.num_experts).tolist()  # JetMoE syncs too
            batch_index = torch.div(index_sorted, K, rounding_mode="floor")
            batch_gates = w.reshape(-1)[index_sorted]
            return index_sorted, batch_index, batch_gates, expert_size, plan.logits_TE
        raise AssertionError(self.fmt)

    def pending(self, router_logits: torch.Tensor):
        """DBRX's ``route_tokens_to_experts``: the weights and ids of the call that made the logits."""
        w, ids = self._pending
        del self._pending
        return w, ids


def _switch_forward(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Switch's block forward for any number of slots per token (its own handles exactly one)."""
    B, L, D = hidden_states.shape
    onehot_TKE, w_TK, _ = block.router(hidden_states)
    out = block.experts(hidden_states.reshape(-1, D), onehot_TKE, w_TK)
    return out.reshape(B, L, D)


class HFMoEBlock(nn.Module):
    """A transformers MoE block replaced by an ``impls.MoELayer`` (``swap_routers(mode="layer")``).

    Called as the block was (``hidden_states [batch, seq, H]``) and answering in its format
    (gpt-oss' blocks return a pair). The layer's plan of the last call is ``self.plan``.
    """

    def __init__(self, layer: MoELayer, returns_pair: bool, state: _State):
        super().__init__()
        self.layer = layer
        self.returns_pair = returns_pair
        self._state = state
        self.plan: Any = None

    @property
    def router(self) -> Router:
        return self.layer.router

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        mask = self._state.token_mask
        if mask is not None and tuple(mask.shape) != tuple(hidden_states.shape[:-1]):
            mask = None
        out, plan = self.layer(hidden_states, mask)
        self.plan = plan
        if not self.returns_pair:
            return out
        weights = getattr(plan, "weights_TK", None)
        return out, weights


@dataclass
class SwappedRouters:
    """What ``swap_routers`` replaced, and how a training loop uses the new routers.

    Attributes:
        model: the model whose blocks were changed.
        replaced: ``{block name: original router module}`` (``mode="gate"``) or
            ``{block name: original block}`` (``mode="layer"``).
        modules: ``{block name: the module now routing}`` (the shim or the ``HFMoEBlock``).
        loss_coefficients: weights of the plans' losses summed by ``aux_loss()``.
        mode: ``"gate"`` or ``"layer"``.

    Training loop, the one documented way::

        swapped = impls.hf.swap_routers(model, "sinkhorn_ot", k=2)
        for batch in loader:
            with swapped.token_mask(batch["attention_mask"]):   # optional: padding routes nowhere
                out = model(**batch)
            loss = out.loss + swapped.aux_loss()                 # routers' weighted aux losses
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            swapped.step()                                       # routers' between-step state
    """

    model: nn.Module
    replaced: dict[str, nn.Module]
    modules: dict[str, nn.Module]
    loss_coefficients: dict[str, float]
    mode: str
    _state: _State
    _restore: list[Callable[[], None]]

    @property
    def routers(self) -> dict[str, Router]:
        """``{block name: impls router}``."""
        return {n: m.router for n, m in self.modules.items()}

    def plans(self) -> dict[str, Any]:
        """``{block name: plan of the last forward}`` (``None`` before the first)."""
        return {n: m.plan for n, m in self.modules.items()}

    def aux_loss(self, coefficients: Mapping[str, float] | None = None) -> torch.Tensor:
        """Sum over blocks of ``plan.aux_loss(coefficients)`` for the last forward.

        Default coefficients: ``loss_coefficients`` (the router preset's, or those given to
        ``swap_routers``). A zero tensor before any forward or when no weight is set.
        """
        coefs = self.loss_coefficients if coefficients is None else dict(coefficients)
        total = None
        for m in self.modules.values():
            if m.plan is None:
                continue
            loss = m.plan.aux_loss(coefs)
            total = loss if total is None else total + loss
        if total is None:
            p = next(self.model.parameters())
            return p.new_zeros((), dtype=torch.float32)
        return total

    def step(self, process_group=None) -> None:
        """``Router.on_optimizer_step()`` on every swapped router (after ``optimizer.step()``)."""
        for m in self.modules.values():
            step_routers(m.router, process_group)

    @contextlib.contextmanager
    def token_mask(self, attention_mask: torch.Tensor | None) -> Iterator[None]:
        """Route only real tokens inside the block: ``attention_mask`` ``[batch, seq]`` (1 = token)."""
        prev = self._state.token_mask
        self._state.token_mask = None if attention_mask is None else attention_mask.bool()
        try:
            yield
        finally:
            self._state.token_mask = prev

    def restore(self) -> None:
        """Put the original routers (or blocks) back."""
        for undo in reversed(self._restore):
            undo()
        self._restore.clear()


_FORMATS = {
    "mixtral": "triple",
    "qwen2_moe": "triple",
    "qwen3_moe": "triple",
    "olmoe": "triple",
    "jamba": "triple",
    "deepseek_v2": "triple",
    "deepseek_v3": "triple",
    "gpt_oss": "triple",
    "dbrx": "logits",
    "jetmoe": "jetmoe",
    "switch_transformers": "switch",
}


def _set_child(root: nn.Module, qualname: str, module: nn.Module) -> None:
    parent_name, _, child = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _init_from_gate(router: Router, weight: torch.Tensor, bias: torch.Tensor | None, where: str) -> None:
    gate = getattr(router, "gate", None)
    if not isinstance(gate, nn.Linear) or tuple(gate.weight.shape) != tuple(weight.shape):
        log.info(
            "swap_routers: %s: the new router's gate has another shape; it keeps its own initialization",
            where,
        )
        return
    _copy(gate.weight, weight)
    if bias is not None and gate.bias is not None:
        _copy(gate.bias, bias)


def swap_routers(
    model: nn.Module,
    router: str | Callable[[nn.Module], Router],
    *,
    mode: str = "auto",
    init_from_gate: bool = True,
    loss_coefficients: Mapping[str, float] | None = None,
    **options: Any,
) -> SwappedRouters:
    """Replace the routing of every supported MoE block of ``model`` with the router ``router``.

    Args:
        model: a transformers model (or any module holding supported MoE blocks).
        router: an ``impls`` registry or preset name (``"sinkhorn_ot"``, ``"aux_loss_free"``, ...),
            or a factory ``block -> Router`` called once per block (``lambda b: from_hf(b).router``
            rebuilds each block's own routing as an ``impls`` router).
        mode: ``"gate"`` keeps each block and its experts (transformers' own modules, weights,
            state-dict keys and experts implementation) and replaces only its router module;
            ``"layer"`` replaces each block by an ``HFMoEBlock`` running ``from_hf(block)`` with the
            new router (the experts' weights copied; the layer's own dispatch and grouped experts),
            which also takes routers whose plans are not top-k slots (Soft MoE, merged experts);
            ``"auto"`` = ``"gate"`` for token-choice routers, else ``"layer"``.
        init_from_gate: start the new router's gate projection from the block's (same shape only).
        loss_coefficients: weights for ``SwappedRouters.aux_loss()``; default: the preset's.
        **options: router options (``k``, ``capacity_factor``, ...). ``num_experts`` and
            ``d_model`` come from each block; ``k`` defaults to the block's ``top_k``.

    Returns a ``SwappedRouters`` handle (see its docstring for the training loop). The model's own
    router auxiliary loss (``output_router_logits``) is switched off: transformers computes it from
    its own router classes, which are gone; ``handle.aux_loss()`` replaces it. Hub kernels that
    replace a whole MoE forward (``use_kernels=True``) would bypass the new router and are refused.
    """
    if mode not in ("auto", "gate", "layer"):
        raise ValueError(f"swap_routers: mode must be 'auto', 'gate' or 'layer', got {mode!r}")
    if getattr(model, "_use_kernels", False) or getattr(model, "use_kernels", False) is True:
        raise ValueError(
            "swap_routers: the model uses hub kernels (use_kernels=True), which replace whole MoE "
            "forwards, router included; load it with use_kernels=False"
        )
    _check_version()
    blocks = find_moe_blocks(model)
    if not blocks:
        known = ", ".join(sorted(SUPPORTED_BLOCKS))
        raise UnsupportedBlockError(
            f"swap_routers: {type(model).__name__} holds no supported MoE block ({known})"
        )
    if isinstance(router, str):
        from impls.registry import ROUTERS

        if router not in PRESETS and router not in ROUTERS:
            build_router(router, d_model=1, num_experts=1)  # raises the registry's KeyError
    elif not callable(router):
        raise TypeError(f"swap_routers: router must be a name or a factory block -> Router, got {router!r}")
    elif options:
        raise TypeError(f"swap_routers: options {sorted(options)} need a router name, not a factory")
    state = _State()
    handle = SwappedRouters(
        model=model,
        replaced={},
        modules={},
        loss_coefficients={},
        mode=mode,
        _state=state,
        _restore=[],
    )
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "output_router_logits", False):
        config.output_router_logits = False
        handle._restore.append(lambda: setattr(config, "output_router_logits", True))
        log.info("swap_routers: output_router_logits switched off; add handle.aux_loss() instead")
    for name, block in blocks.items():
        spec = _spec_of(block)
        E, D = spec.num_experts(block), spec.d_model(block)
        if isinstance(router, str):
            built = _build_for(router, D, E, spec.top_k(block), dict(options))
        else:
            built = router(block)
            if not isinstance(built, Router) or (built.d_model, built.num_experts) != (D, E):
                raise ValueError(
                    f"swap_routers: the factory must return an impls Router with d_model={D} and "
                    f"num_experts={E} for {name}, got {built!r}"
                )
        built.train(block.training)
        built.to(next(block.parameters()).device)
        if init_from_gate:
            w, b = spec.gate_weight(block)
            _init_from_gate(built, w, b, name)
        chosen = mode
        if mode == "auto":
            chosen = "gate" if getattr(built, "plan_type", "tokens") == "tokens" else "layer"
        elif mode == "gate" and getattr(built, "plan_type", "tokens") != "tokens":
            raise ValueError(
                f"swap_routers: {built.name!r} returns {built.plan_type} plans, which a transformers "
                "experts module cannot run; use mode='layer'"
            )
        if built.routing_inputs:
            raise ValueError(
                f"swap_routers: {built.name!r} needs routing inputs {built.routing_inputs} that a "
                "transformers block does not receive; use impls.MoELayer directly"
            )
        if chosen == "gate":
            _swap_gate(handle, name, block, spec, built, state)
        else:
            _swap_layer(handle, name, block, spec, built, state)
    handle.mode = "gate" if all(isinstance(m, _RouterShim) for m in handle.modules.values()) else "layer"
    preset = PRESETS.get(router) if isinstance(router, str) else None
    coefs = (
        loss_coefficients if loss_coefficients is not None else (preset.loss_coefficients if preset else {})
    )
    handle.loss_coefficients = dict(coefs)
    log.info("swap_routers: %d blocks now route with %s (%s mode)", len(handle.modules), router, handle.mode)
    return handle


def _build_for(router: str, d_model: int, num_experts: int, top_k: int, opts: dict[str, Any]) -> Router:
    """The router for one block: ``k`` defaults to the block's unless the preset or options set it."""
    preset = PRESETS.get(router)
    fixed = dict(preset.options) if preset else {}
    if "k" not in opts and "k" not in fixed:
        try:
            return build_router(router, d_model=d_model, num_experts=num_experts, k=top_k, **opts)
        except (TypeError, ValueError):
            pass  # the router takes no k (or only its own): build it as given
    return build_router(router, d_model=d_model, num_experts=num_experts, **opts)


def _swap_gate(handle, name, block, spec: _Spec, built: Router, state: _State) -> None:
    fmt = _FORMATS[spec.family]
    shim = _RouterShim(built, fmt, state)
    old = getattr(block, spec.router_attr)
    setattr(block, spec.router_attr, shim)
    undo_hooks = []

    def remember_length(module, args):
        h = args[0] if args else None
        if isinstance(h, torch.Tensor) and h.dim() == 3:
            shim.sequence_length = h.shape[1]

    undo_hooks.append(block.register_forward_pre_hook(remember_length))
    if fmt == "logits":
        block.route_tokens_to_experts = shim.pending
    if fmt == "switch":
        block.forward = types.MethodType(_switch_forward, block)

    def undo() -> None:
        setattr(block, spec.router_attr, old)
        for h in undo_hooks:
            h.remove()
        for attr in ("route_tokens_to_experts", "forward"):
            if attr in block.__dict__:
                delattr(block, attr)

    handle.replaced[name] = old
    handle.modules[name] = shim
    handle._restore.append(undo)


def _swap_layer(handle, name, block, spec: _Spec, built: Router, state: _State) -> None:
    layer = from_hf(block)
    layer.router = built
    layer.loss_coefficients = {}
    wrapper = HFMoEBlock(layer, returns_pair=spec.family == "gpt_oss", state=state)
    wrapper.train(block.training)
    _set_child(handle.model, name, wrapper)
    handle.replaced[name] = block
    handle.modules[name] = wrapper
    handle._restore.append(lambda: _set_child(handle.model, name, block))
