"""Base class of every router: the shared steps, with subclasses deciding only the assignment.

Template (flaxformer's ``Router`` split, in PyTorch):

1. validate ``x_TD`` (shape, dtype) and the optional padding mask; a ``[batch, seq, D]`` input is
   flattened to ``T = batch * seq`` tokens and its sequence length recorded (``Router.sequence_length``,
   for sequence-level losses);
2. cast to **float32** explicitly, with any enclosing ``torch.autocast`` region switched off for
   steps 3-5 (CPU autocast ignores float32 and would run the gate in bfloat16);
3. multiplicative input jitter ``x * U(1-eps, 1+eps)`` in training (Switch, Fedus et al. 2021);
4. gate logits ``h = x W_r`` in float32 (``Router.compute_logits()``);
5. ``Router.route()`` — the subclass's decision, returning a pre-capacity ``RoutingPlan``;
6. optional capacity (``capacity_factor``): slots beyond an expert's capacity are dropped, first
   choices before second choices (``impls.functional.capacity_keep()``). Losses in the plan come
   from step 5, i.e. from the decision *before* capacity.

Noise and sampling are off in ``eval()``, so evaluation is deterministic.

Edge inputs, the same for every router:

* **Padding** (``token_mask_T`` False) keeps no slot: its ``keep_TK`` is False and its weights are 0,
  whatever the subclass returned, and it takes no capacity and no part in any loss.
* **Non-finite tokens** are routed nowhere. A token whose input or gate logits hold a NaN or an
  infinity is treated as padding (so it changes neither the routing, the weights nor the losses of
  any other token, and receives no expert output), its logits are replaced by zeros before any
  routing math (its logit gradient is zero, and every other token's gradient stays finite), and
  ``plan.info["nonfinite_tokens"]`` counts such tokens (a 0-d tensor). The check reads the
  ``[T, E]`` logits only, so finite inputs pay nothing on the ``[T, D]`` side. Not protected: the
  gate's *weight* gradient (``g^T x`` holds ``0 * NaN``), since in a model a non-finite input
  makes the task loss, and so every gradient, non-finite anyway. Routers that synchronize with
  the host anyway (``nonfinite_sync``: transport, assignment, expert choice) check once per call
  and take their masked path only when such a token is present; the others always fold the check
  into the mask.
* **Empty batches** (``T = 0``, from ``[0, D]`` or ``[batch, 0, D]``) give an empty plan whose
  losses are finite zeros (with a gradient path to the gate); router state (bias, duals, step
  counters) is left as it was.

State a router keeps in float32 whatever the module is cast to (e.g. the expert bias of
auxiliary-loss-free balancing) is named in ``Router.fp32_buffers``; ``module.to(torch.bfloat16)``
moves those buffers between devices but never changes their dtype.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from impls.functional import capacity_keep, expert_capacity
from impls.plan import RoutingPlan


def all_reduce_sum(tensor: torch.Tensor, process_group: Any = None) -> torch.Tensor:
    """Sum ``tensor`` in place over ``process_group`` (when one is given and ``torch.distributed`` is
    initialized); returns it. The one place routers exchange their between-step statistics."""
    if process_group is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, group=process_group)
    return tensor


def recomputing_in_backward() -> bool:
    """Whether this forward is a recomputation inside backward (activation checkpointing), where
    routers must not update their between-step state a second time. Inside a ``torch.compile``
    graph the forward is traced once and its state updates are part of it: ``False``."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """Options every router accepts. Subclasses extend it with their own frozen dataclass.

    Attributes:
        k: experts per token (the number of routing slots for token-choice routers).
        jitter_eps: multiplicative input jitter in training; 0 disables it.
        router_bias: add a bias to the gate projection (most papers use none).
        capacity_factor: enforce expert capacity ``ceil(cf * T * k / E)`` in training; ``None`` =
            dropless.
        eval_capacity_factor: capacity factor in ``eval()``; ``None`` = same as training.
        min_capacity: lower bound on the capacity (DeepSpeed's ``min_capacity``).
        drop_policy: which tokens lose when an expert overflows: ``"position"`` (later tokens),
            ``"probability"`` (lower router probability; V-MoE's batch-prioritized routing) or
            ``"random"`` (a uniformly random subset of the expert's tokens is kept in training:
            DeepSpeed's Random Token Selection, used by Z-code M3; ``"position"`` in ``eval()``).
        capacity_groups: where the capacity applies: ``"batch"`` (one capacity per expert over
            all tokens of the call), ``"sequence"`` (each sequence has its own capacity, computed
            from its length: Switch Transformer's and Hugging Face's per-sequence capacity; needs a
            ``[batch, seq, D]`` input or ``sequence_length``) or an int ``G`` (consecutive groups
            of ``G`` tokens, Mesh-TensorFlow's ``group_size``; must divide the token count). All
            groups are served in one vectorized call.
        expert_capacity: a fixed capacity per expert and group (Hugging Face Switch
            Transformers' ``config.expert_capacity``), in training and evaluation, instead of
            one computed from ``capacity_factor``.
    """

    k: int = 1
    jitter_eps: float = 0.0
    router_bias: bool = False
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    min_capacity: int = 0
    drop_policy: Literal["position", "probability", "random"] = "position"
    capacity_groups: Literal["batch", "sequence"] | int = "batch"
    expert_capacity: int | None = None

    @property
    def has_capacity(self) -> bool:
        """Whether any capacity option is set (routers that drop nothing refuse them)."""
        return any(
            v is not None for v in (self.capacity_factor, self.eval_capacity_factor, self.expert_capacity)
        )

    def validate(self, num_experts: int) -> None:
        """Raise ``ValueError`` naming the bad option; subclasses extend this."""
        if not 1 <= self.k <= num_experts:
            raise ValueError(f"k must be in [1, num_experts={num_experts}], got k={self.k}")
        if self.jitter_eps < 0 or self.jitter_eps >= 1:
            raise ValueError(f"jitter_eps must be in [0, 1), got {self.jitter_eps}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {v}")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}")
        if self.drop_policy not in ("position", "probability", "random"):
            raise ValueError(
                f"drop_policy must be 'position', 'probability' or 'random', got {self.drop_policy!r}"
            )
        g = self.capacity_groups
        if not (g in ("batch", "sequence") or (isinstance(g, int) and not isinstance(g, bool) and g > 0)):
            raise ValueError(f"capacity_groups must be 'batch', 'sequence' or a positive int, got {g!r}")
        c = self.expert_capacity
        if c is not None and (not isinstance(c, int) or isinstance(c, bool) or c <= 0):
            raise ValueError(f"expert_capacity must be a positive int or None, got {c!r}")


class Router(nn.Module):
    """Maps tokens ``x_TD`` to a ``RoutingPlan``. Subclasses implement ``route()``.

    Class attributes every concrete router sets:
        name: registry name.
        papers: catalog slugs of the works it implements (the catalog links back).
        causal: whether a token's routing depends only on itself (and earlier tokens), i.e. the
            router is usable for autoregressive decoding.
        Config: its config dataclass.
    """

    name: ClassVar[str] = ""
    papers: ClassVar[tuple[str, ...]] = ()
    causal: ClassVar[bool] = True
    Config: ClassVar[type[RouterConfig]] = RouterConfig
    #: the router balances expert load exactly by construction in training (expert choice, BASE,
    #: ...); the contract tests then require equal loads.
    balanced_by_construction: ClassVar[bool] = False
    #: names of buffers kept in float32 under ``module.to(dtype)`` (see the module docstring).
    fp32_buffers: ClassVar[tuple[str, ...]] = ()
    #: check for non-finite tokens with one host sync and route unmasked when there is none (for
    #: routers whose masked path costs more than a sync; see the module docstring).
    nonfinite_sync: ClassVar[bool] = False
    #: what ``forward`` returns: ``"tokens"`` (a ``RoutingPlan``), ``"slots"`` (a ``SlotPlan``,
    #: soft token merging) or ``"merge"`` (a ``MergePlan``, soft expert merging).
    plan_type: ClassVar[str] = "tokens"
    #: names of the integer inputs the router needs besides ``x`` (``token_ids``, ``domain_ids``,
    #: ...), passed to ``forward`` as keywords; ``input_ranges()`` gives their valid ranges.
    routing_inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__()
        if not isinstance(d_model, int) or d_model <= 0:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(num_experts, int) or num_experts <= 0:
            raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
        try:
            cfg = self.Config(**options) if config is None else dataclasses.replace(config, **options)
        except TypeError as exc:
            fields = sorted(f.name for f in dataclasses.fields(self.Config))
            raise TypeError(f"{type(self).__name__}: {exc}; valid options: {fields}") from None
        cfg.validate(num_experts)
        self.config = cfg
        self.d_model = d_model
        self.num_experts = num_experts
        self.gate = nn.Linear(d_model, num_experts, bias=cfg.router_bias, dtype=torch.float32)

    # ------------------------------------------------------------------ template
    def forward(
        self,
        x_TD: torch.Tensor,
        token_mask_T: torch.Tensor | None = None,
        *,
        sequence_length: int | None = None,
        **inputs: torch.Tensor,
    ) -> RoutingPlan:
        """Route ``x`` (``[T, D]``, or ``[batch, seq, D]`` flattened token-major).

        Args:
            x_TD: tokens; any floating dtype (routing math runs in float32).
            token_mask_T: ``bool``, True = valid token, shaped like ``x`` without its last axis.
            sequence_length: tokens per sequence when ``x`` is ``[T, D]`` with ``T = batch * seq``
                (only sequence-level losses use it); inferred from a 3-D ``x``.
            **inputs: the integer inputs named in ``routing_inputs`` (token ids, domain ids, ...),
                each shaped like ``x`` without its last axis, or ``[batch]`` (one per sequence).
        """
        inputs = self._check_routing_inputs(x_TD, sequence_length, inputs)
        if isinstance(x_TD, torch.Tensor) and x_TD.dim() == 3:
            batch, seq, _ = x_TD.shape
            if sequence_length is not None and sequence_length != seq:
                raise ValueError(
                    f"{type(self).__name__}: sequence_length={sequence_length} contradicts x of shape "
                    f"{tuple(x_TD.shape)}"
                )
            sequence_length = seq
            x_TD = x_TD.reshape(batch * seq, x_TD.shape[-1])
            if isinstance(token_mask_T, torch.Tensor) and token_mask_T.dim() == 2:
                token_mask_T = token_mask_T.reshape(-1)
        x_TD, token_mask_T = self._check_inputs(x_TD, token_mask_T)
        self._inputs = inputs
        try:
            if x_TD.shape[0] == 0:
                return self._empty_plan(x_TD)
            return self._forward_tokens(x_TD, token_mask_T, sequence_length)
        finally:
            self._inputs = {}

    def _forward_tokens(self, x_TD, token_mask_T, sequence_length) -> RoutingPlan:
        if sequence_length is not None and (sequence_length <= 0 or x_TD.shape[0] % sequence_length):
            raise ValueError(
                f"{type(self).__name__}: sequence_length={sequence_length} does not divide the "
                f"{x_TD.shape[0]} tokens"
            )
        return self._route_tokens(x_TD, token_mask_T, sequence_length)

    def _route_tokens(
        self, x_TD: torch.Tensor, token_mask_T: torch.Tensor | None, sequence_length: int | None
    ) -> RoutingPlan:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            eps = self.config.jitter_eps
            if self.training and eps > 0:
                x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
            logits_TE = self.compute_logits(x_TD)
            # A NaN or infinity anywhere in a token's input makes its whole logit row non-finite
            # (IEEE: NaN * w and inf * 0 are NaN), so the check runs on [T, E], not on [T, D].
            finite_T = torch.isfinite(logits_TE).all(-1)
            nonfinite = (~finite_T).sum()
            # routers that sync anyway pay for the mask only when a non-finite token is there;
            # compiled, every router takes the masked path (the same result, no data-dependent branch)
            if not self.nonfinite_sync or torch.compiler.is_compiling() or bool(nonfinite):
                logits_TE = logits_TE.masked_fill(~finite_T[:, None], 0.0)
                token_mask_T = finite_T if token_mask_T is None else token_mask_T & finite_T
            self._sequence_length = sequence_length
            try:
                plan = self._apply_capacity(self.route(logits_TE, x_TD, token_mask_T))
            finally:
                self._sequence_length = None
            keep_TK, weights_TK = plan.keep_TK & (plan.expert_ids_TK >= 0), plan.weights_TK
            if token_mask_T is not None:  # padding keeps no slot, whatever route() returned
                keep_TK = keep_TK & token_mask_T[:, None]
                weights_TK = torch.where(token_mask_T[:, None], weights_TK, torch.zeros_like(weights_TK))
            info = {**plan.info, "nonfinite_tokens": nonfinite}
            return dataclasses.replace(plan, keep_TK=keep_TK, weights_TK=weights_TK, info=info)

    def _empty_plan(self, x_TD: torch.Tensor) -> RoutingPlan:
        """The plan of ``T = 0`` tokens: one padding token routed, then sliced away; state restored."""
        self._inputs = {n: torch.zeros(1, dtype=torch.long, device=x_TD.device) for n in self._inputs}
        saved = {name: buf.clone() for name, buf in self.named_buffers()}
        extra = (
            self.get_extra_state() if type(self).get_extra_state is not nn.Module.get_extra_state else None
        )
        try:
            pad = x_TD.new_zeros(1, x_TD.shape[-1])
            plan = self._route_tokens(pad, torch.zeros(1, dtype=torch.bool, device=x_TD.device), None)
        finally:
            with (
                torch.no_grad()
            ):  # only what changed: a copy into a buffer autograd saved would break backward
                for name, buf in self.named_buffers():
                    if not torch.equal(buf, saved[name]):
                        buf.copy_(saved[name])
            if extra is not None:
                self.set_extra_state(extra)
        empty = {
            name: getattr(plan, name)[:0]
            for name in ("expert_ids_TK", "weights_TK", "keep_TK", "scores_TE", "logits_TE", "token_mask_T")
        }
        info = {**plan.info, "nonfinite_tokens": plan.info["nonfinite_tokens"] * 0}
        return dataclasses.replace(plan, **empty, info=info)

    # ------------------------------------------------------------------ routing inputs
    def input_ranges(self) -> dict[str, int]:
        """Exclusive upper bound of each routing input (``{"token_ids": vocab_size}``); override."""
        return {}

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        """The routing inputs of the batch being routed, flattened to ``long [T]`` (inside ``route()``)."""
        return getattr(self, "_inputs", {})

    def _check_routing_inputs(
        self, x: torch.Tensor, sequence_length: int | None, inputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Validate the routing inputs and flatten each to ``long [T]``; errors name the input."""
        name = type(self).__name__
        unknown = sorted(set(inputs) - set(self.routing_inputs))
        if unknown:
            valid = ", ".join(self.routing_inputs) or "none"
            raise TypeError(f"{name}: unexpected routing input(s) {unknown}; this router takes: {valid}")
        missing = [n for n in self.routing_inputs if inputs.get(n) is None]
        if missing:
            raise TypeError(f"{name}: missing routing input(s) {missing} (pass them as keywords to forward)")
        if not self.routing_inputs:
            return {}
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            return {}  # _check_inputs reports the bad x
        lead = tuple(x.shape[:-1])
        seq = lead[1] if len(lead) == 2 else sequence_length
        ranges = self.input_ranges()
        out = {}
        for n in self.routing_inputs:
            v = inputs[n]
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{name}: {n} must be a torch.Tensor of integer ids, got {type(v).__name__}")
            if v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool:
                raise TypeError(f"{name}: {n} must hold integer ids, got dtype {v.dtype}")
            if v.device != x.device:
                raise ValueError(f"{name}: {n} is on {v.device} but x is on {x.device}")
            if tuple(v.shape) == lead:
                flat = v.reshape(-1)
            elif v.dim() == 1 and seq and v.shape[0] * seq == math.prod(lead):
                flat = v.repeat_interleave(seq)  # one id per sequence
            else:
                per_seq = f" or [{math.prod(lead) // seq}] (one per sequence)" if seq else ""
                raise ValueError(f"{name}: {n} must have shape {list(lead)}{per_seq}, got {list(v.shape)}")
            bound = ranges.get(n)
            if flat.numel() and bound is not None:
                if torch.compiler.is_compiling():
                    # in a compiled graph the check stays on the device (no graph break, no sync)
                    ok = (flat.min() >= 0) & (flat.max() < bound)
                    torch._assert_async(ok, f"{name}: {n} must be in [0, {bound})")
                else:
                    # one host sync per input: an id out of range must not index a table silently
                    lo, hi = torch.stack([flat.min(), flat.max()]).tolist()
                    if lo < 0 or hi >= bound:
                        bad = lo if lo < 0 else hi
                        raise ValueError(f"{name}: {n} must be in [0, {bound}), got {bad}")
            out[n] = flat.long()
        return out

    @property
    def sequence_length(self) -> int | None:
        """Tokens per sequence of the batch being routed (valid inside ``route()``), else ``None``."""
        return getattr(self, "_sequence_length", None)

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Gate logits ``x W_r (+ b)`` in float32, whatever dtype the module was cast to."""
        w = self.gate.weight.float()
        b = self.gate.bias.float() if self.gate.bias is not None else None
        return nn.functional.linear(x_TD, w, b)

    def route(
        self, logits_TE: torch.Tensor, x_TD: torch.Tensor, token_mask_T: torch.Tensor | None
    ) -> RoutingPlan:
        """Decide the assignment from float32 logits; return the plan before capacity."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state between steps
    def on_optimizer_step(self, process_group=None) -> None:
        """Update the router's between-step state; call once after every ``optimizer.step()``.

        No-op by default. Routers that keep training state overwrite it: DeepSeek's
        auxiliary-loss-free bias, ReMoE's adaptive L1 coefficient, DynMoE's expert
        recording schedule. Under gradient accumulation call it once per optimizer step, after
        the last micro-batch; under data parallelism pass ``process_group`` so that every rank
        applies the same update. ``impls.step_routers(model)`` calls it on every router of a model.
        """

    # ------------------------------------------------------------------ properties
    @property
    def is_causal(self) -> bool:
        """Whether routing a token depends only on itself and earlier tokens *in the current mode*.

        ``causal`` says it for the routing rule. A capacity limit can break it: dropping by
        probability lets later tokens evict earlier ones, and so does serving all first choices
        before any second choice (a later token's first choice evicts an earlier token's second).
        """
        if self.current_capacity(1) is None:
            return self.causal
        policy = self.config.drop_policy
        positional = policy == "position" or (policy == "random" and not self.training)
        by_position = positional and self.max_experts_per_token == 1
        return self.causal and by_position

    @property
    def max_experts_per_token(self) -> int:
        """Most slots a token can fill (``k`` for fixed top-k; override for variable-k routers)."""
        return self.config.k

    @property
    def compile_break(self) -> str | None:
        """Why ``torch.compile(router, fullgraph=True)`` cannot capture one graph in the current mode
        (a host sync or an object the compiler cannot trace), or ``None`` when it can.

        Routers with a reason still compile without ``fullgraph`` (the compiler breaks the graph
        there and runs that step eagerly) and give the eager result. Override per router.
        """
        return None

    @property
    def combine_normalization(self) -> float | str | None:
        """What a routed token's combine weights sum to, before drops (checked by the contract tests).

        A float (``1.0`` for weights renormalized over the chosen experts; another constant for a
        routed scaling factor), ``"at_most_one"`` for raw probabilities of a subset of a
        distribution, or ``None`` when the router promises neither. Override per router.
        """
        return None

    # ------------------------------------------------------------------ helpers
    def current_capacity(self, num_tokens: int) -> int | None:
        """Capacity for ``num_tokens`` under the current mode (train/eval), or ``None`` if dropless."""
        if self.config.expert_capacity is not None:
            return max(1, min(num_tokens, max(self.config.min_capacity, self.config.expert_capacity)))
        cf = self.config.capacity_factor
        if not self.training and self.config.eval_capacity_factor is not None:
            cf = self.config.eval_capacity_factor
        if cf is None:
            return None
        return expert_capacity(num_tokens, self.num_experts, self.config.k, cf, self.config.min_capacity)

    def capacity_group_size(self, num_tokens: int) -> int:
        """Tokens per capacity group for a call of ``num_tokens`` (see ``capacity_groups``)."""
        g = self.config.capacity_groups
        if g == "batch":
            return num_tokens
        if g == "sequence":
            if self.sequence_length is None:
                raise ValueError(
                    f"{type(self).__name__}: capacity_groups='sequence' needs a [batch, seq, D] input "
                    "or sequence_length="
                )
            return self.sequence_length
        if num_tokens % g:
            raise ValueError(
                f"{type(self).__name__}: capacity_groups={g} does not divide the {num_tokens} tokens"
            )
        return g

    def _apply_capacity(self, plan: RoutingPlan) -> RoutingPlan:
        group = self.capacity_group_size(plan.num_tokens)
        cap = self.current_capacity(group)
        if cap is None:
            return plan
        policy, priority_TK = self.config.drop_policy, None
        if policy == "random":  # Random Token Selection: a random priority per slot, in training only
            policy = "probability" if self.training else "position"
            priority_TK = torch.rand(plan.expert_ids_TK.shape, device=plan.expert_ids_TK.device)
        elif policy == "probability":
            priority_TK = self.drop_priority(plan)
        keep = capacity_keep(
            plan.expert_ids_TK,
            self.num_experts,
            cap,
            policy=policy,
            priority_TK=priority_TK,
            token_mask_T=plan.token_mask_T,
            group_size=group,
        )
        keep = keep & plan.keep_TK
        weights = torch.where(keep, plan.weights_TK, torch.zeros_like(plan.weights_TK))
        # the dispatch's static bound on any expert's rows: every group may fill it
        bound = cap * (plan.num_tokens // group)
        return dataclasses.replace(plan, keep_TK=keep, weights_TK=weights, capacity=bound)

    def drop_priority(self, plan: RoutingPlan) -> torch.Tensor:
        """Priority of each slot under ``drop_policy="probability"``: the router's score of that choice."""
        return plan.scores_TE.gather(1, plan.expert_ids_TK.clamp_min(0))

    def _check_inputs(
        self, x_TD: torch.Tensor, token_mask_T: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        name = type(self).__name__
        if not isinstance(x_TD, torch.Tensor):
            raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x_TD).__name__}")
        if x_TD.dim() != 2 or x_TD.shape[-1] != self.d_model:
            raise ValueError(f"{name}: x must have shape [tokens, {self.d_model}], got {tuple(x_TD.shape)}")
        if not x_TD.is_floating_point():
            raise TypeError(f"{name}: x must be a floating-point tensor, got {x_TD.dtype}")
        if token_mask_T is not None:
            if token_mask_T.dtype != torch.bool:
                raise TypeError(
                    f"{name}: token_mask must be bool (True = valid token), got {token_mask_T.dtype}"
                )
            if tuple(token_mask_T.shape) != (x_TD.shape[0],):
                raise ValueError(
                    f"{name}: token_mask must have shape [{x_TD.shape[0]}], got {tuple(token_mask_T.shape)}"
                )
        return x_TD, token_mask_T

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # keep fp32 state in fp32 across module.to(dtype)/half()/bfloat16(): only its device follows
        saved = {n: self._buffers[n] for n in self.fp32_buffers if self._buffers.get(n) is not None}
        for n in saved:
            self._buffers[n] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for n, buf in saved.items():
                device = fn(torch.empty(0, dtype=buf.dtype, device=buf.device)).device
                self._buffers[n] = buf.to(device=device)
        return self

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, config={self.config}"


@dataclass(frozen=True, kw_only=True)
class SequenceRouterConfig(RouterConfig):
    """Options of a ``SequenceRouter``: the token-choice options that make no sense there are refused."""

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        self.reject_token_choice_options()

    def reject_token_choice_options(self) -> None:
        if self.has_capacity:
            raise ValueError(
                "this router drops no token (no expert has a capacity); capacity_factor is not supported"
            )
        if self.jitter_eps:
            raise ValueError("this router uses no input jitter; jitter_eps is not supported")


def step_routers(model: nn.Module, process_group=None) -> None:
    """Call ``Router.on_optimizer_step()`` on every router inside ``model`` (after ``optimizer.step()``)."""
    for module in model.modules():
        if isinstance(module, Router):
            # a router that routes the global batch (ExpertParallel's global routing) already saw
            # every rank's tokens: summing its statistics over the ranks again would count them twice
            global_stats = getattr(module, "_ep_global_stats", False)
            module.on_optimizer_step(None if global_stats else process_group)


class SequenceRouter(Router):
    """Base of the routers whose decision is dense over a whole sequence (``plan_type`` ``"slots"`` or
    ``"merge"``): Soft MoE's slots, SMEAR's and Lory's merged experts.

    ``forward(x, token_mask)`` takes ``[B, L, D]`` (or ``[T, D]`` with ``sequence_length``; without
    it, the ``T`` tokens are one sequence) and calls ``route_sequences(x_BLD, token_mask_BL)`` in
    float32 with autocast off. Edge inputs follow ``Router``: padding takes no part in any mixture,
    pool or loss; a token holding a NaN or an infinity is treated as padding and zeroed (the check
    reads ``x``, since pooled routers would otherwise spread it over the sequence) and counted in
    ``plan.info["nonfinite_tokens"]``; an empty batch gives an empty plan.
    """

    plan_type: ClassVar[str] = "merge"

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        *,
        sequence_length: int | None = None,
        **inputs: torch.Tensor,
    ):
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.shape[-1] != self.d_model:
            raise ValueError(
                f"{name}: x must have shape [batch, seq, {self.d_model}] or [tokens, {self.d_model}], "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{name}: x must be a floating-point tensor, got {x.dtype}")
        if token_mask is not None:
            if not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool:
                got = token_mask.dtype if isinstance(token_mask, torch.Tensor) else type(token_mask).__name__
                raise TypeError(f"{name}: token_mask must be bool (True = valid token), got {got}")
            if tuple(token_mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(
                    f"{name}: token_mask must have shape {list(x.shape[:-1])}, got {list(token_mask.shape)}"
                )
        if x.dim() == 2:
            T = x.shape[0]
            seq = T if sequence_length is None else sequence_length
            if seq <= 0 and T:
                raise ValueError(f"{name}: sequence_length must be > 0, got {sequence_length}")
            if T and T % seq:
                raise ValueError(f"{name}: sequence_length={sequence_length} does not divide the {T} tokens")
            B = T // seq if T else 0
            x = x.reshape(B, seq if T else 0, self.d_model)
            if token_mask is not None:
                token_mask = token_mask.reshape(x.shape[:2])
        elif sequence_length is not None and sequence_length != x.shape[1]:
            raise ValueError(
                f"{name}: sequence_length={sequence_length} contradicts x of shape {tuple(x.shape)}"
            )
        inputs = self._check_routing_inputs(x, None, inputs)
        self._inputs = {k: v.reshape(x.shape[:2]) for k, v in inputs.items()}
        try:
            with torch.autocast(device_type=x.device.type, enabled=False):
                x = x.float()
                finite_BL = torch.isfinite(x).all(-1)
                mask_BL = finite_BL if token_mask is None else token_mask & finite_BL
                x = torch.where(mask_BL[..., None], x, x.new_zeros(()))
                plan = self.route_sequences(x, mask_BL)
        finally:
            self._inputs = {}
        info = {**plan.info, "nonfinite_tokens": (~finite_BL).sum()}
        return dataclasses.replace(plan, info=info)

    def route_sequences(self, x_BLD: torch.Tensor, token_mask_BL: torch.Tensor):
        """The decision for ``x_BLD`` (float32; padding and non-finite tokens zeroed, masked False)."""
        raise NotImplementedError

    @property
    def is_causal(self) -> bool:
        return self.causal
