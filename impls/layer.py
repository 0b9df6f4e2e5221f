"""The MoE layer: gate → router → dispatch → grouped expert compute → combine.

Shape suffixes follow the legend of ``impls.plan`` (``T`` tokens, ``D`` model, ``E`` experts,
``K`` slots per token, ``F`` expert hidden width) plus ``N = T * K``, the rows of the expert batch.

Five roles, five pieces:

* **router** — any ``impls.Router`` (or a registry / preset name); returns a
  ``impls.RoutingPlan``;
* **dispatch** — ``make_dispatch()`` sorts the ``T * K`` slots by expert (a stable sort of small
  integer keys; slots that are empty, padding or dropped go to a sentinel bucket at the end) and
  ``permute()`` gathers the token rows into that order; parameter-free;
* **experts** — ``GroupedExperts``, ``E`` MLPs (GELU, ReLU, SwiGLU, GEGLU or gpt-oss' clamped
  SwiGLU; optional expert biases) as stacked weights, computed with one grouped matrix multiply
  per projection (``torch._grouped_mm``; inside a ``torch.compile`` graph, for dtypes other than
  bfloat16, through the opaque ``moe_atlas::grouped_mm`` op), or, where that kernel is
  unavailable (float64, unaligned widths, old torch), an exact padded ``bmm`` fallback; never a
  Python loop over experts;
* **combine** — ``combine()`` gathers each slot's expert output back (every index distinct, so
  forward and backward are deterministic on every device: no ``index_add_``/``scatter_add_``
  with colliding indices), weights it and sums over ``K`` with float32 accumulation (fused in
  one ``embedding_bag`` for float32 rows on CPU); the result is cast back to the input dtype;
* **layer** — ``MoELayer`` composes them and adds always-on shared experts and an optional
  output bias (JetMoE).

The layer returns only the expert mixture; **the caller adds the residual** (``x + moe(x)[0]``),
so tokens dropped by a capacity limit contribute exactly zero and keep only the residual stream.

The naive loop over experts lives in ``impls.oracle``, as the test oracle only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from impls.plan import MergePlan, RoutingPlan, SlotPlan
from impls.registry import PRESETS, build_router
from impls.router import Router

Activation = Literal["gelu", "relu", "swiglu", "geglu", "gpt_oss_swiglu"]
ExpertImpl = Literal["auto", "grouped_mm", "bmm"]
_ACTIVATIONS = ("gelu", "relu", "swiglu", "geglu", "gpt_oss_swiglu")
#: activations whose input projection has two halves, ``[gate | up]``
GATED_ACTIVATIONS = frozenset({"swiglu", "geglu", "gpt_oss_swiglu"})
_IMPLS = ("auto", "grouped_mm", "bmm")

# ---------------------------------------------------------------------------------- dispatch


@dataclass(frozen=True, eq=False)
class Dispatch:
    """Where every routed slot goes in the expert batch (``N = T * K`` rows grouped by expert,
    plus one spare row ``N`` that belongs to no expert and stands for "nothing" in gathers).

    Attributes:
        token_N: token feeding sorted row ``n`` (``N + 1`` entries).
        slot_pos_TK: sorted row of slot ``(t, j)`` (a permutation of ``0..N-1``).
        slot_N: flat slot ``t * K + j`` of each sorted row (the inverse permutation).
        gather_TK: ``slot_pos_TK`` where the slot is computed, else the spare row ``N``.
        counts_E: rows per expert; rows ``>= counts_E.sum()`` belong to no expert.
        valid_N: sorted row ``n`` is computed by an expert (``N + 1`` entries).
        keep_TK: slot is computed (routed, valid token, within capacity).
        capacity: static bound on ``counts_E`` when the plan had one, else ``None``.
    """

    token_N: torch.Tensor
    slot_pos_TK: torch.Tensor
    slot_N: torch.Tensor
    gather_TK: torch.Tensor
    counts_E: torch.Tensor
    valid_N: torch.Tensor
    keep_TK: torch.Tensor
    capacity: int | None

    @property
    def spare_row(self) -> int:
        return self.token_N.shape[0] - 1


def make_dispatch(plan: RoutingPlan) -> Dispatch:
    """Sort the plan's slots by expert; no host sync, static shapes (``N + 1`` rows)."""
    T, K = plan.expert_ids_TK.shape
    E, N = plan.num_experts, T * K
    device = plan.expert_ids_TK.device
    keep_TK = plan.keep_TK & plan.selected_TK
    key_N = torch.where(keep_TK, plan.expert_ids_TK, E).reshape(-1)
    sorted_key_N, order_N = torch.sort(key_N, stable=True)
    bounds = torch.searchsorted(sorted_key_N, torch.arange(E + 1, device=device))  # no atomics
    counts_E = bounds.diff()
    slot_pos = torch.empty_like(order_N)
    slot_pos[order_N] = torch.arange(N, device=device)
    slot_pos_TK = slot_pos.view(T, K)
    token_N = torch.div(order_N, K, rounding_mode="floor")
    spare = torch.zeros(1, dtype=torch.long, device=device)
    return Dispatch(
        token_N=torch.cat([token_N, spare]),
        slot_pos_TK=slot_pos_TK,
        slot_N=order_N,
        gather_TK=torch.where(keep_TK, slot_pos_TK, N),
        counts_E=counts_E,
        valid_N=torch.cat([sorted_key_N < E, spare.bool()]),
        keep_TK=keep_TK,
        capacity=plan.capacity,
    )


def _fused_bag(t: torch.Tensor) -> bool:
    """``embedding_bag`` (one fused gather-weight-sum) is used on CPU for float32/float64 rows."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def _bag_sum(rows_ND: torch.Tensor, d: Dispatch, w_TK: torch.Tensor | None) -> torch.Tensor:
    """``sum_j w_tj * rows[gather_tj]`` over kept slots in one ``embedding_bag`` (the spare row is
    its padding index, so its value is never read); for CPU float32/float64 rows."""
    w = None if w_TK is None else w_TK.to(rows_ND.dtype)
    return F.embedding_bag(
        d.gather_TK, rows_ND.contiguous(), per_sample_weights=w, mode="sum", padding_idx=d.spare_row
    )


class _PermuteRows(torch.autograd.Function):
    """``x_TD[token_N]`` whose backward sums the ``K`` copies of a token without atomics.

    The backward gathers through ``gather_TK``, so rows that belong to no expert are never read:
    ``torch._grouped_mm`` leaves those rows of its input gradient unwritten (uninitialized).
    """

    @staticmethod
    def forward(ctx, x_TD, d):  # type: ignore[override]
        ctx.d = d
        return x_TD.index_select(0, d.token_N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ND):  # type: ignore[override]
        if _fused_bag(grad_ND):
            return _bag_sum(grad_ND, ctx.d, None), None
        return _kept_rows(grad_ND, ctx.d).sum(1), None


def permute(x_TD: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """Token rows in expert order, ``[N + 1, D]`` (deterministic backward)."""
    return _PermuteRows.apply(x_TD, d)


#: up to this many slots per token the combine sums elementwise; above, with ``bmm``
_ELEMENTWISE_MAX_K = 4


class _WeightedUnpermute(torch.autograd.Function):
    """``out_t = sum_j w_tj * y[gather_tj]`` (kept slots only), with a gather-only backward.

    Forward: gather the ``K`` rows of each token, zero the slots that are not computed (their rows
    may hold uninitialized values, and ``NaN * 0`` is ``NaN``), weight them and sum over ``K``
    (the products are rounded to the rows' dtype, as in Megatron-Core and Hugging Face; the sum
    accumulates in float32). Backward: the row gradient ``w_tj * grad_t`` is put back in sorted
    order by a *gather* through the inverse permutation (no zero fill, no atomics,
    deterministic); the weight gradient ``<grad_t, y[gather_tj]>`` is summed in float32. The
    gathered rows are recomputed in backward instead of saved, so the layer keeps no
    ``[T, K, D]`` activation.

    The ``K``-sums run elementwise for ``K <= 4`` and as a ``bmm`` over ``T`` small matrices above:
    on an H100 (``T=16384, D=2048``) the ``bmm`` took 1.5 ms of a 13.5 ms step at ``K=2``, while at
    ``K=16`` the elementwise form, which materializes a ``[T, K, D]`` product, was the slower one.
    """

    @staticmethod
    def forward(ctx, y_ND, w_TK, d):  # type: ignore[override]
        ctx.d = d
        ctx.save_for_backward(y_ND, w_TK)
        r_TKD, w = _kept_rows(y_ND, d), w_TK.to(y_ND.dtype)
        if r_TKD.shape[1] <= _ELEMENTWISE_MAX_K:
            return (r_TKD * w.unsqueeze(-1)).sum(1)
        return torch.bmm(w.unsqueeze(1), r_TKD).squeeze(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_TD):  # type: ignore[override]
        y_ND, w_TK = ctx.saved_tensors
        d = ctx.d
        T, K = d.gather_TK.shape
        N, D = T * K, y_ND.shape[1]
        grad_1TD = grad_TD.to(y_ND.dtype).unsqueeze(1)
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            # slot (t, j) holds w_tj * grad_t; unkept slots have w = 0, so their rows get exact zeros
            g_TKD = grad_1TD * w_TK.to(y_ND.dtype).unsqueeze(-1)
            grad_y = y_ND.new_empty(N + 1, D)
            torch.index_select(g_TKD.view(N, D), 0, d.slot_N, out=grad_y[:N])
            grad_y[N].zero_()
        if ctx.needs_input_grad[1]:
            r_TKD = _kept_rows(y_ND, d)
            if K <= _ELEMENTWISE_MAX_K:
                acc = torch.promote_types(y_ND.dtype, torch.float32)
                grad_w = (r_TKD * grad_1TD).sum(-1, dtype=acc).to(w_TK.dtype)
            else:
                grad_w = torch.bmm(r_TKD, grad_1TD.transpose(1, 2)).squeeze(-1).to(w_TK.dtype)
        return grad_y, grad_w, None


def _kept_rows(y_ND: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """``[T, K, D]`` rows of every slot, zero where the slot is not computed."""
    T, K = d.gather_TK.shape
    r_TKD = y_ND.index_select(0, d.gather_TK.reshape(-1)).view(T, K, -1)
    return torch.where(d.keep_TK[..., None], r_TKD, r_TKD.new_zeros(()))


def combine(
    y_ND: torch.Tensor, d: Dispatch, weights_TK: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``out_t = sum_j w_tj * y[slot_pos_tj]`` over kept slots, cast to ``out_dtype``.

    Every index is distinct (``slot_pos_TK`` is a permutation; dropped and empty slots read the
    spare row, whose value is never used), so forward and backward are deterministic on every
    device. On CPU with float32/float64 rows the gather, weighting and sum run fused in
    ``embedding_bag`` (accumulated in float32, float64 for float64 experts). Elsewhere (CUDA, half
    precision) ``_WeightedUnpermute`` does it as a masked gather, a weighted sum over ``K``
    accumulated in float32 (products rounded to the rows' dtype), and a gather-only backward.
    """
    if y_ND.shape[0] != d.token_N.shape[0]:
        raise ValueError(f"combine: y has {y_ND.shape[0]} rows, the dispatch has {d.token_N.shape[0]}")
    w_TK = torch.where(d.keep_TK, weights_TK, weights_TK.new_zeros(()))
    if _fused_bag(y_ND):
        return _bag_sum(y_ND, d, w_TK).to(out_dtype)
    return _WeightedUnpermute.apply(y_ND, w_TK, d).to(out_dtype)


# ---------------------------------------------------------------------------------- experts


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s backward rejects stride-0 (expanded) gradients, e.g. from ``.sum()``.
    """

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.contiguous()


def _gmm_eager(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x, w, offs=offs)


def _gmm_fake(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[-1])


def _gmm_backward_eager(x, w, offs, grad):
    grad = grad.contiguous()
    grad_x = torch._grouped_mm(grad, w.transpose(-2, -1), offs=offs)
    grad_w = torch._grouped_mm(x.t(), grad, offs=offs)
    return grad_x.contiguous(), grad_w.contiguous()  # the layouts the fake kernel promises


def _gmm_backward_fake(x, w, offs, grad):
    return x.new_empty(x.shape), w.new_empty(w.shape)  # contiguous, as the kernel returns them


def _gmm_setup(ctx, inputs, output):
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _gmm_backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    grad_x, grad_w = torch.ops.moe_atlas.grouped_mm_backward(x, w, offs, grad)
    return grad_x, grad_w, None


# ``torch._grouped_mm``'s compiler rules (fake tensors, inductor lowering) accept bfloat16 only,
# while its eager CPU/CUDA kernels also run float32: compiled graphs call it through this opaque
# op for other dtypes (the compiler schedules the eager kernel; forward and backward).
torch.library.custom_op(
    "moe_atlas::grouped_mm", _gmm_eager, mutates_args=(), schema="(Tensor x, Tensor w, Tensor offs) -> Tensor"
)
torch.library.register_fake("moe_atlas::grouped_mm", _gmm_fake)
torch.library.custom_op(
    "moe_atlas::grouped_mm_backward",
    _gmm_backward_eager,
    mutates_args=(),
    schema="(Tensor x, Tensor w, Tensor offs, Tensor grad) -> (Tensor, Tensor)",
)
torch.library.register_fake("moe_atlas::grouped_mm_backward", _gmm_backward_fake)
torch.library.register_autograd("moe_atlas::grouped_mm", _gmm_backward, setup_context=_gmm_setup)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(x, w, offs=offs)``; inside a compiled graph, for dtypes other than
    bfloat16, through the opaque ``moe_atlas::grouped_mm`` op (the compiler has rules for
    bfloat16 only)."""
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return torch.ops.moe_atlas.grouped_mm(x, w, offs)
    return torch._grouped_mm(x, w, offs=offs)


@functools.cache
def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # the first call may come while a graph is being traced: probe on real tensors, eagerly
    with unset_fake_temporarily(), torch.enable_grad():
        return _grouped_mm_runs(device_type, dtype)


@torch.compiler.assume_constant_result
def grouped_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs (forward and backward) for this device type and dtype.

    Probed once per ``(device_type, dtype)`` on a tiny aligned problem and cached; a compiled
    graph takes the answer as a constant (the probe runs eagerly, outside the graph).
    """
    return _probe_grouped_mm(device_type, dtype)


def _grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        device = torch.device(device_type)
        x = torch.randn(16, 16, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
        offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
        y = torch._grouped_mm(x, w, offs=offs)
        y.backward(torch.ones_like(y))
        return bool(torch.isfinite(w.grad).all())
    except Exception:  # the kernel is missing for this device/dtype
        return False


@functools.cache
def _cpu_has_half_matmul() -> bool:
    cpu = torch.cpu
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, f)()) for f in probes if hasattr(cpu, f))


@torch.compiler.assume_constant_result
def _native_half_matmul_on_cpu() -> bool:
    """Whether this CPU has bfloat16/float16 matrix instructions (AVX512-BF16 or AMX)."""
    return _cpu_has_half_matmul()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts' matmuls run in for rows ``x``: ``x``'s, except half precision on a CPU
    without native half-precision matmuls, which runs in float32 in eager mode (see
    ``GroupedExperts.forward``). Inside a compiled graph the compiler's own half-precision lowering
    is used: the float32 detour gave wrong gradients under inductor (torch 2.13)."""
    if torch.compiler.is_compiling():
        return x.dtype
    if (
        x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float16)
        and not _native_half_matmul_on_cpu()
    ):
        return torch.float32
    return x.dtype


def _aligned(dtype: torch.dtype, *widths: int) -> bool:
    """``torch._grouped_mm`` needs every row stride to be a multiple of 16 bytes."""
    elem = torch.empty((), dtype=dtype).element_size()
    return all((w * elem) % 16 == 0 for w in widths)


class _RowBias(torch.autograd.Function):
    """``h + b[expert_N]`` for rows sorted by expert, with a deterministic bias gradient.

    The gradient of a gathered bias is a scatter-add with colliding indices (atomics on CUDA);
    since the rows are grouped by expert, it is instead a segmented sum over the groups
    (``torch.segment_reduce``), the same on every device. Rows past the last group (dropped or
    spare rows) get the last expert's bias; they are never read.
    """

    @staticmethod
    def forward(ctx, h_NF, b_EF, expert_N, counts_E):  # type: ignore[override]
        ctx.save_for_backward(counts_E)
        return h_NF + b_EF.index_select(0, expert_N).to(h_NF.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_NF):  # type: ignore[override]
        (counts_E,) = ctx.saved_tensors
        grad_b = None
        if ctx.needs_input_grad[1]:
            rest = grad_NF.shape[0] - counts_E.sum()
            lengths = torch.cat([counts_E, rest.view(1)])
            g = grad_NF.to(torch.promote_types(grad_NF.dtype, torch.float32))
            grad_b = torch.segment_reduce(g, "sum", lengths=lengths, axis=0)[:-1]
        return grad_NF, grad_b, None, None


class GroupedExperts(nn.Module):
    """``E`` expert MLPs as stacked weights: ``y = act(x W_in[e] + b_in[e]) W_out[e] + b_out[e]``.

    Activations: ``"gelu"`` (exact, erf), ``"relu"`` (Switch Transformer, T5), and the gated
    ``"swiglu"`` ``silu(x W_g) * (x W_u)`` (Shazeer 2020; Mixtral, DeepSeek, Qwen, ...),
    ``"geglu"`` ``gelu(x W_g) * (x W_u)`` and ``"gpt_oss_swiglu"``, gpt-oss's clamped form
    ``(clamp(x W_u, -l, l) + 1) * g * sigmoid(alpha g)`` with ``g = min(x W_g, l)``,
    ``alpha = swiglu_alpha`` (1.702) and ``l = swiglu_limit`` (7.0). Non-gated: ``W_in`` is
    ``[E, D, F]``; gated: ``[E, D, 2F]`` with the gate and up projections side by side
    (``[gate | up]``). ``bias=True`` adds the expert biases ``b_in [E, F or 2F]`` and ``b_out [E, D]``
    (gpt-oss); without, none (most MoE LLMs). Initialization as ``nn.Linear`` (uniform, fan-in).
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: Activation = "gelu",
        *,
        bias: bool = False,
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        for name, v in (("num_experts", num_experts), ("d_model", d_model), ("d_hidden", d_hidden)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"GroupedExperts: {name} must be a positive int, got {v!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"GroupedExperts: activation must be one of {_ACTIVATIONS}, got {activation!r}")
        self.num_experts, self.d_model, self.d_hidden, self.activation = (
            num_experts,
            d_model,
            d_hidden,
            activation,
        )
        self.swiglu_alpha, self.swiglu_limit = float(swiglu_alpha), float(swiglu_limit)
        width_in = 2 * d_hidden if activation in GATED_ACTIVATIONS else d_hidden
        kw = {"dtype": dtype, "device": device}
        # stored output-major, as nn.Linear and transformers store them ([E, out, in] in memory),
        # seen as [E, in, out]: CPU grouped matmuls run faster on this layout (2.5x in bfloat16)
        self.w_in_EDF = nn.Parameter(torch.empty(num_experts, width_in, d_model, **kw).transpose(1, 2))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, d_model, d_hidden, **kw).transpose(1, 2))
        self.b_in_EF: nn.Parameter | None = None
        self.b_out_ED: nn.Parameter | None = None
        if bias:
            self.b_in_EF = nn.Parameter(torch.empty(num_experts, width_in, **kw))
            self.b_out_ED = nn.Parameter(torch.empty(num_experts, d_model, **kw))
        self.reset_parameters()

    @property
    def has_bias(self) -> bool:
        return self.b_in_EF is not None

    def reset_parameters(self) -> None:
        with torch.no_grad():
            b_in, b_out = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_hidden)
            self.w_in_EDF.uniform_(-b_in, b_in)
            self.w_out_EFD.uniform_(-b_out, b_out)
            if self.b_in_EF is not None and self.b_out_ED is not None:
                self.b_in_EF.uniform_(-b_in, b_in)
                self.b_out_ED.uniform_(-b_out, b_out)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        a = self.activation
        if a == "gelu":
            return F.gelu(h)
        if a == "relu":
            return F.relu(h)
        g, u = h.chunk(2, dim=-1)
        if a == "swiglu":
            return F.silu(g) * u
        if a == "geglu":
            return F.gelu(g) * u
        lim = self.swiglu_limit  # gpt_oss_swiglu
        g, u = g.clamp(max=lim), u.clamp(-lim, lim)
        return (u + 1) * (g * torch.sigmoid(g * self.swiglu_alpha))

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on ``x [n, D]`` with plain matmuls (used by the loop oracle)."""
        h = x @ self.w_in_EDF[e]
        if self.b_in_EF is not None:
            h = h + self.b_in_EF[e]
        y = self._act(h) @ self.w_out_EFD[e]
        if self.b_out_ED is not None:
            y = y + self.b_out_ED[e]
        return y

    def dense_forward(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """Every expert on its own rows: ``x_ECD [E, C, D] -> [E, C, D]`` (one ``bmm`` per projection).

        Used for Soft MoE's slots, where each expert gets the same number of rows.
        """
        return self._batched(x_ECD, self.w_in_EDF, self.w_out_EFD, self.b_in_EF, self.b_out_ED)

    def _batched(self, x_BND, w_in, w_out, b_in, b_out) -> torch.Tensor:
        """``act(x W_in + b_in) W_out + b_out`` batched over the first axis (``bmm``)."""
        h = torch.bmm(x_BND, w_in)
        if b_in is not None:
            h = h + b_in[:, None, :]
        y = torch.bmm(self._act(h), w_out)
        return y if b_out is None else y + b_out[:, None, :]

    def merged_forward(self, x_GND: torch.Tensor, w_GE: torch.Tensor) -> torch.Tensor:
        """Merged experts: group ``g``'s rows go through the expert ``sum_e w[g, e] * theta_e``.

        ``x_GND [G, N, D]``, ``w_GE [G, E]``; the merged weights are built for every group
        (``G * D * F`` values per projection), then one ``bmm`` per projection.
        """
        w = w_GE.to(self.w_in_EDF.dtype)
        w_in = torch.einsum("ge,edf->gdf", w, self.w_in_EDF)
        w_out = torch.einsum("ge,efd->gfd", w, self.w_out_EFD)
        b_in = b_out = None
        if self.b_in_EF is not None and self.b_out_ED is not None:
            b_in, b_out = w @ self.b_in_EF, w @ self.b_out_ED
        return self._batched(x_GND, w_in, w_out, b_in, b_out)

    def resolve_impl(self, impl: ExpertImpl, x: torch.Tensor) -> str:
        if impl not in _IMPLS:
            raise ValueError(f"expert_impl must be one of {_IMPLS}, got {impl!r}")
        if impl != "auto":
            return impl
        ok = grouped_mm_available(x.device.type, x.dtype) and _aligned(
            x.dtype, self.d_model, self.d_hidden, self.w_in_EDF.shape[-1]
        )
        return "grouped_mm" if ok else "bmm"

    def forward(self, x_ND: torch.Tensor, d: Dispatch, impl: ExpertImpl = "auto") -> torch.Tensor:
        """Expert outputs for rows sorted by expert; rows outside every group are unspecified.

        Half-precision experts on a CPU without native bfloat16/float16 matrix units (no AVX512-BF16,
        no AMX) compute their matmuls in float32 on the same values and round the result back:
        those CPUs emulate half-precision matmuls (about 25x slower than float32 here), and the
        result differs from a half-precision matmul with float32 accumulation only by summation
        order. Gradients reach the weights in their own dtype.
        """
        return self.forward_weights(
            x_ND, d, (self.w_in_EDF, self.w_out_EFD, self.b_in_EF, self.b_out_ED), impl
        )

    def forward_weights(
        self,
        x_ND: torch.Tensor,
        d: Dispatch,
        weights: Sequence[torch.Tensor | None],
        impl: ExpertImpl = "auto",
    ) -> torch.Tensor:
        """``forward`` with given expert weights ``(w_in, w_out, b_in, b_out)`` stacked over
        ``len(d.counts_E)`` groups (expert parallelism computes a rank's experts together with
        the ones sent to it for the step)."""
        work = compute_dtype(x_ND)
        if work != x_ND.dtype:
            ws = tuple(None if w is None else w.to(work) for w in weights)
            return self._forward(x_ND.to(work), d, impl, ws).to(x_ND.dtype)
        return self._forward(x_ND, d, impl, tuple(weights))

    def _weights(self, work: torch.dtype | None):
        ws = (self.w_in_EDF, self.w_out_EFD, self.b_in_EF, self.b_out_ED)
        if work is None:
            return ws
        return tuple(None if w is None else w.to(work) for w in ws)

    def _forward(self, x_ND: torch.Tensor, d: Dispatch, impl: ExpertImpl, weights) -> torch.Tensor:
        w_in, w_out, b_in, b_out = weights
        how = self.resolve_impl(impl, x_ND)
        if how == "grouped_mm":
            ends_E = torch.cumsum(d.counts_E, 0)
            offs = ends_E.to(torch.int32)
            h = _ContiguousGrad.apply(grouped_mm(x_ND, w_in, offs))
            expert_N = None
            if b_in is not None and b_out is not None:
                row = torch.arange(x_ND.shape[0], device=x_ND.device)
                expert_N = torch.searchsorted(ends_E, row, right=True).clamp_max(d.counts_E.shape[0] - 1)
                h = _RowBias.apply(h, b_in, expert_N, d.counts_E)
            y = _ContiguousGrad.apply(grouped_mm(self._act(h), w_out, offs))
            if expert_N is not None:
                y = _RowBias.apply(y, b_out, expert_N, d.counts_E)
            return y
        return self._padded_bmm(x_ND, d, (w_in, w_out, b_in, b_out))

    def _padded_bmm(self, x_ND: torch.Tensor, d: Dispatch, weights=None) -> torch.Tensor:
        """Exact fallback: scatter rows into ``[E, C, D]`` and run one ``bmm`` per projection.

        ``C`` is the plan's capacity when it has one (static); in dropless mode it is the largest
        group, read with one device-to-host sync.
        """
        E, N = d.counts_E.shape[0], x_ND.shape[0]
        C = d.capacity if d.capacity is not None else int(d.counts_E.max().item())
        C = max(C, 1)
        starts_E = torch.cumsum(d.counts_E, 0) - d.counts_E
        row = torch.arange(N, device=x_ND.device)
        expert_N = torch.searchsorted(torch.cumsum(d.counts_E, 0), row, right=True).clamp_max(E - 1)
        pos_N = row - starts_E[expert_N]
        ok_N = d.valid_N & (pos_N < C)
        idx_N = torch.where(ok_N, expert_N * C + pos_N, E * C)  # E*C = a dummy row
        # padding rows stay zero (garbage there would reach the weight gradient as NaN * 0)
        buf = x_ND.new_zeros(E * C + 1, x_ND.shape[1]).index_copy(0, idx_N, x_ND)
        w_in, w_out, b_in, b_out = weights or self._weights(None)
        y = self._batched(buf[: E * C].view(E, C, -1), w_in, w_out, b_in, b_out).reshape(E * C, -1)
        # rows outside every expert are never read downstream: any in-range index will do
        return F.embedding(idx_N.clamp_max(E * C - 1), y)


class SharedExperts(nn.Module):
    """``S`` always-on experts (DeepSeekMoE) fused into one dense MLP of width ``S * F``.

    Concatenating hidden units is exactly the sum of ``S`` separate experts, for GELU and SwiGLU.
    With ``gate=True`` the output is scaled per token by ``sigmoid(x w_g)`` (Qwen1.5-MoE).
    """

    def __init__(
        self,
        d_model,
        d_hidden,
        activation: Activation = "gelu",
        gate: bool = False,
        *,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.mlp = GroupedExperts(1, d_model, d_hidden, activation, dtype=dtype, device=device)
        self.gate = nn.Linear(d_model, 1, bias=False, dtype=dtype, device=device) if gate else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y = self.mlp.expert_forward(0, x_TD)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x_TD))
        return y


# ---------------------------------------------------------------------------------- layer

_LAYER_DEFAULTS: dict[str, Any] = {
    "activation": "gelu",
    "num_shared_experts": 0,
    "d_hidden_shared": None,
    "shared_expert_gate": False,
    "expert_bias": False,
    "output_bias": False,
}


class MoELayer(nn.Module):
    """A mixture-of-experts feed-forward layer returning ``(mixture, plan)``.

    Args:
        d_model: model width ``D``.
        d_hidden: hidden width ``F`` of each routed expert.
        num_experts: routed experts ``E``; may be omitted for presets that fix it.
        router: a ``impls.Router`` instance, or a registry / preset name built with
            ``router_options`` (e.g. ``"mixtral_8x7b"``, ``"switch_base"``, ``"topk"``).
        activation: the experts' activation: ``"gelu"``, ``"relu"``, ``"swiglu"``, ``"geglu"`` or
            ``"gpt_oss_swiglu"`` (see ``GroupedExperts``).
        expert_bias: give every routed expert its input and output biases (gpt-oss).
        output_bias: add one learned bias ``[D]`` to the mixture of every real token (JetMoE's
            layer bias; padding rows stay zero).
        num_shared_experts: always-on experts applied to every token (DeepSeekMoE).
        d_hidden_shared: hidden width of each shared expert (default ``d_hidden``).
        shared_expert_gate: scale the shared output by a learned per-token sigmoid (Qwen1.5-MoE).
        expert_impl: ``"auto"`` (grouped matmul where it runs, else the padded ``bmm``),
            ``"grouped_mm"`` or ``"bmm"``.
        loss_coefficients: weights for ``plan.aux_loss``; default: the preset's, else none.
        dtype, device: of the expert weights (the router keeps float32 math regardless).
        materialize_experts: ``False`` puts the routed experts on the ``meta`` device (shapes only, no
            memory, no random draws): for ``impls.parallel.ExpertParallel.build``, which gives every
            rank only its own experts.
        **router_options: router config fields (``k``, ``capacity_factor``,
            ``eval_capacity_factor``, ``min_capacity``, ``drop_policy``, ...), when ``router``
            is a name.

    ``None`` for a layer option means: the preset's value (``Preset.layer``) if any, else the
    default. ``forward(x, padding_mask)`` takes ``[batch, seq, D]`` (or ``[T, D]``) and a ``bool``
    mask (True = real token) and returns the expert mixture in ``x``'s dtype (padding rows are
    zero) and the plan. Add the residual yourself.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int | None = None,
        router: str | Router = "topk",
        *,
        activation: Activation | None = None,
        num_shared_experts: int | None = None,
        d_hidden_shared: int | None = None,
        shared_expert_gate: bool | None = None,
        expert_bias: bool | None = None,
        output_bias: bool | None = None,
        expert_impl: ExpertImpl = "auto",
        loss_coefficients: Mapping[str, float] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        materialize_experts: bool = True,
        **router_options: Any,
    ):
        super().__init__()
        preset = PRESETS.get(router) if isinstance(router, str) else None
        if isinstance(router, Router):
            if router_options:
                raise TypeError(f"MoELayer: router options {sorted(router_options)} need a router name")
            if num_experts is not None and num_experts != router.num_experts:
                raise ValueError(
                    f"MoELayer: num_experts={num_experts} but the router has {router.num_experts}"
                )
            if router.d_model != d_model:
                raise ValueError(f"MoELayer: d_model={d_model} but the router has {router.d_model}")
            self.router = router
        elif isinstance(router, str):
            self.router = build_router(router, d_model=d_model, num_experts=num_experts, **router_options)
        else:
            raise TypeError(f"MoELayer: router must be a name or a Router, got {type(router).__name__}")
        if device is not None:
            self.router.to(device)
        given = {
            "activation": activation,
            "num_shared_experts": num_shared_experts,
            "d_hidden_shared": d_hidden_shared,
            "shared_expert_gate": shared_expert_gate,
            "expert_bias": expert_bias,
            "output_bias": output_bias,
        }
        layer_opts = dict(_LAYER_DEFAULTS)
        if preset is not None:
            unknown = set(preset.layer) - set(layer_opts)
            if unknown:
                raise ValueError(f"preset {preset.name!r} has unknown layer settings {sorted(unknown)}")
            layer_opts.update(preset.layer)
        layer_opts.update({k: v for k, v in given.items() if v is not None})
        if expert_impl not in _IMPLS:
            raise ValueError(f"MoELayer: expert_impl must be one of {_IMPLS}, got {expert_impl!r}")
        n_shared = layer_opts["num_shared_experts"]
        if not isinstance(n_shared, int) or n_shared < 0:
            raise ValueError(f"MoELayer: num_shared_experts must be an int >= 0, got {n_shared!r}")
        self.d_model, self.d_hidden = d_model, d_hidden
        self.num_experts = self.router.num_experts
        self.activation: str = layer_opts["activation"]
        self.expert_impl = expert_impl
        self.experts = GroupedExperts(
            self.num_experts,
            d_model,
            d_hidden,
            self.activation,
            bias=bool(layer_opts["expert_bias"]),
            dtype=dtype,
            device=device if materialize_experts else "meta",
        )
        self.output_bias: nn.Parameter | None = None
        if layer_opts["output_bias"]:
            self.output_bias = nn.Parameter(torch.zeros(d_model, dtype=dtype, device=device))
        self.shared: SharedExperts | None = None
        if n_shared:
            width = n_shared * (layer_opts["d_hidden_shared"] or d_hidden)
            self.shared = SharedExperts(
                d_model,
                width,
                self.activation,
                bool(layer_opts["shared_expert_gate"]),
                dtype=dtype,
                device=device,
            )
        self.num_shared_experts = n_shared
        coefs = (
            loss_coefficients
            if loss_coefficients is not None
            else (preset.loss_coefficients if preset else {})
        )
        self.loss_coefficients: dict[str, float] = dict(coefs)

    # ------------------------------------------------------------------ forward
    def _flatten(self, x: torch.Tensor, padding_mask: torch.Tensor | None):
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"MoELayer: x must be [batch, seq, {self.d_model}] or [T, {self.d_model}], got {shape}"
            )
        seq = x.shape[1] if x.dim() == 3 else None
        mask = None
        if padding_mask is not None:
            if tuple(padding_mask.shape) != tuple(x.shape[:-1]):
                want, got = tuple(x.shape[:-1]), tuple(padding_mask.shape)
                raise ValueError(f"MoELayer: padding_mask must have shape {want}, got {got}")
            if padding_mask.dtype != torch.bool:
                raise TypeError(
                    f"MoELayer: padding_mask must be bool (True = real token), got {padding_mask.dtype}"
                )
            mask = padding_mask.reshape(-1)
        return x.reshape(-1, self.d_model), mask, seq

    def route(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, **inputs: torch.Tensor) -> Any:
        """The router's plan for ``x`` (flattened token-major for token routers)."""
        x_TD, mask_T, seq = self._flatten(x, padding_mask)
        if getattr(self.router, "plan_type", "tokens") != "tokens":
            x_BLD = x if x.dim() == 3 else x[None]
            return self.router(x_BLD, None if mask_T is None else mask_T.view(x_BLD.shape[:2]), **inputs)
        return self.router(x_TD, mask_T, sequence_length=seq, **self._flat_inputs(x, inputs))

    def _flat_inputs(self, x: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Routing inputs shaped like ``x`` without its last axis, flattened as the tokens are."""
        return {
            k: v.reshape(-1) if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(x.shape[:-1]) else v
            for k, v in inputs.items()
        }

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        """``(mixture, plan)``; ``inputs`` are the router's routing inputs (``token_ids``, ...)."""
        x_TD, mask_T, seq = self._flatten(x, padding_mask)
        kind = getattr(self.router, "plan_type", "tokens")
        if kind != "tokens":
            x_BLD = x if x.dim() == 3 else x[None]
            mask_BL = None if mask_T is None else mask_T.view(x_BLD.shape[:2])
            plan = self.router(x_BLD, mask_BL, **inputs)
            out = self.mix_sequences(x_BLD, plan)
            return out.view(x.shape), plan
        plan = self.router(x_TD, mask_T, sequence_length=seq, **self._flat_inputs(x, inputs))
        out_TD = self.mix(x_TD, plan, mask_T)
        return out_TD.view(x.shape), plan

    def mix_sequences(self, x_BLD: torch.Tensor, plan: SlotPlan | MergePlan) -> torch.Tensor:
        """Expert mixture for a ``SlotPlan`` (Soft MoE) or a ``MergePlan`` (merged experts)."""
        B, L, D = x_BLD.shape
        mask_BL = plan.token_mask_BL
        dtype = self.experts.w_in_EDF.dtype
        # padding and non-finite rows are zero before any mixing (0 * NaN would spread otherwise)
        xz = x_BLD if mask_BL is None else torch.where(mask_BL[..., None], x_BLD, x_BLD.new_zeros(()))
        if B * L == 0:
            return x_BLD * 0
        if isinstance(plan, SlotPlan):
            E, p = plan.num_experts, plan.slots_per_expert
            slots_BSD = torch.einsum("bls,bld->bsd", plan.dispatch_BLS, xz.float())
            slots_ECD = slots_BSD.view(B, E, p, D).permute(1, 0, 2, 3).reshape(E, B * p, D)
            y_ECD = self.experts.dense_forward(slots_ECD.to(dtype))
            y_BSD = y_ECD.view(E, B, p, D).permute(1, 0, 2, 3).reshape(B, E * p, D)
            out = torch.einsum("bls,bsd->bld", plan.combine_BLS, y_BSD.float())
        elif isinstance(plan, MergePlan):
            G, n = plan.num_groups, plan.group_length
            pad = G * n - L
            xg = torch.nn.functional.pad(xz, (0, 0, 0, pad)) if pad else xz
            y = self.experts.merged_forward(
                xg.reshape(B * G, n, D).to(dtype), plan.weights_BGE.reshape(B * G, -1)
            )
            out = y.reshape(B, G * n, D)[:, :L]
        else:
            raise TypeError(
                f"MoELayer: router returned {type(plan).__name__}, expected a SlotPlan or MergePlan"
            )
        out = out.to(x_BLD.dtype)
        if mask_BL is not None:
            out = torch.where(mask_BL[..., None], out, out.new_zeros(()))
        if self.shared is not None or self.output_bias is not None:
            mask_T = None if mask_BL is None else mask_BL.reshape(-1)
            out = self._add_shared(out.reshape(B * L, D), xz.reshape(B * L, D), mask_T).view(B, L, D)
        return out

    def expert_outputs(self, x_TD: torch.Tensor, plan: RoutingPlan) -> tuple[torch.Tensor, Dispatch]:
        """Dispatch and run the routed experts: ``(y_ND, dispatch)``."""
        d = make_dispatch(plan)
        xc = x_TD.to(self.experts.w_in_EDF.dtype)
        return self.experts(permute(xc, d), d, self.expert_impl), d

    def mix(self, x_TD: torch.Tensor, plan: RoutingPlan, mask_T: torch.Tensor | None = None) -> torch.Tensor:
        """Routed mixture plus shared experts for flattened tokens, in ``x_TD``'s dtype."""
        if x_TD.shape[0] == 0:  # an empty batch: an empty output, still part of the graph
            return x_TD * 0
        y_ND, d = self.expert_outputs(x_TD, plan)
        out_TD = combine(y_ND, d, plan.weights_TK, x_TD.dtype)
        return self._add_shared(out_TD, x_TD, mask_T)

    def _add_shared(self, out_TD, x_TD, mask_T):
        """Add the shared experts and the output bias (padding rows stay zero)."""
        if self.shared is None and self.output_bias is None:
            return out_TD
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD.to(self.experts.w_in_EDF.dtype)).to(out_TD.dtype)
        if self.output_bias is not None:
            out_TD = out_TD + self.output_bias.to(out_TD.dtype)
        if mask_T is not None:
            out_TD = torch.where(mask_T[:, None], out_TD, out_TD.new_zeros(()))
        return out_TD

    def forward_tasks(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], Sequence[RoutingPlan]]:
        """One mixture per task for multi-gate routers (MMoE): experts run once, gates differ.

        Needs a router with ``route_tasks`` (e.g. ``dense_softmax`` with ``num_tasks > 1``).
        """
        route_tasks = getattr(self.router, "route_tasks", None)
        if route_tasks is None:
            raise TypeError(f"MoELayer.forward_tasks: router {type(self.router).__name__} has no route_tasks")
        x_TD, mask_T, seq = self._flatten(x, padding_mask)
        plans = route_tasks(x_TD, mask_T, sequence_length=seq)
        y_ND, d = self.expert_outputs(x_TD, plans[0])
        for p in plans[1:]:
            if not (
                torch.equal(p.expert_ids_TK, plans[0].expert_ids_TK)
                and torch.equal(p.keep_TK, plans[0].keep_TK)
            ):
                raise ValueError("MoELayer.forward_tasks: task plans must route to the same experts")
        outs = [
            self._add_shared(combine(y_ND, d, p.weights_TK, x_TD.dtype), x_TD, mask_T).view(x.shape)
            for p in plans
        ]
        return outs, plans

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_hidden={self.d_hidden}, num_experts={self.num_experts}, "
            f"activation={self.activation!r}, num_shared_experts={self.num_shared_experts}, "
            f"expert_bias={self.experts.has_bias}, output_bias={self.output_bias is not None}, "
            f"expert_impl={self.expert_impl!r}"
        )
