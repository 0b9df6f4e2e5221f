"""Expert parallelism on ``torch.distributed``: an ``MoELayer`` with its routed experts sharded over ranks.

``ExpertParallel(layer, process_group=None)`` keeps, on each of the group's ``W`` ranks, the
``E / W`` routed experts that rank owns (rank ``p``: experts ``p * E/W ... (p+1) * E/W - 1``,
sliced from a full layer with identical weights on every rank), and one copy of everything else:
the router, the shared experts and the output bias (replicated parameters, to be averaged or
summed over the ranks like any data-parallel parameter). Each rank passes its own tokens.

One forward, on every rank:

1. **routing** — ``routing="global"`` (default): the ranks exchange their token counts, all-gather
   the routing input (the ``[T, D]`` hidden states, padding masks and routing inputs such as token
   ids), and every rank runs the router on the concatenation, with the same random stream in
   training, so every rank holds the same plan for the whole batch and keeps its own slice. This
   is what makes the layer equal to one process on all ranks' tokens for *every* router: capacity
   over the global batch, Sinkhorn's marginals, expert choice's per-expert top-C, BIP's duals,
   batch-level losses, and stateful balancers (auxiliary-loss-free bias, quantile balancing, ...)
   that see global counts and so stay identical on every rank. Cost: one all-gather of the routing
   input and ``W`` times the router's (small) compute. ``routing="local"``: every rank routes its
   own tokens (the usual data-parallel routing: per-rank capacity, per-rank losses; between-step
   state is synchronized by ``step()``, which passes the group to ``on_optimizer_step``);
2. **dispatch** — the rows (token copies) are sorted by expert, the dispatch policy (``impls.parallel
   .policies``; standard EP by default) decides on which rank each row is computed, split sizes
   follow from the global counts every rank knows, and one ``all_to_all_single`` with uneven
   splits sends the rows; where a policy computes an expert on a rank that does not own it, one
   more ``all_to_all_single`` sends that expert's weights for the step;
3. **experts** — each rank runs one grouped matrix multiply per projection over the experts it
   computes (``GroupedExperts``' kernels);
4. **combine** — the reverse ``all_to_all_single`` brings every row back to its source, where it
   is unsorted, weighted and summed as in ``MoELayer`` (shared experts and the output bias are
   added locally).

Autograd runs through every exchange (the all-gather's backward is an all-to-all and a sum; an
all-to-all's backward is the reverse all-to-all), so expert weights receive the gradients of
every rank's tokens, and a rank's input receives the gradient of every use of it.

**Losses and gradient scale.** ``grad_reduction="mean"`` (default, what
``DistributedDataParallel`` does): the objective is the mean of the ranks' losses; the
replicated parameters' gradients are to be averaged over the ranks (DDP), the experts'
gradients are divided by ``W`` here (their owner receives every rank's contribution), and with
global routing each rank's plan carries the global batch's losses (adding them on every rank then
gives, after averaging, the gradient of the global loss). ``grad_reduction="sum"``: the objective
is the sum of the ranks' losses; replicated gradients are to be summed (``all_reduce_grads()``),
expert gradients are left as they are, and each rank's plan carries ``1/W`` of every global loss.
Under either, every gradient equals the single-process layer's on the concatenated batch for
the matching objective.

Every rank must run the backward pass through every ``ExpertParallel`` layer it ran forward (its
peers wait for it in the reverse exchanges; a rank without tokens, or one that receives no rows,
still joins them). Host syncs per forward: the token-count exchange (one small all-gather) and the
split sizes of the all-to-alls, which expert parallelism needs by nature. Routers whose plan is not
a ``RoutingPlan`` (Soft MoE's slots, merged experts) cannot be sharded this way and are refused.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from impls.layer import Dispatch, GroupedExperts, MoELayer, combine, make_dispatch, permute
from impls.parallel.fp4 import fake_nvfp4
from impls.parallel.policies import Assignment, DispatchPolicy, build_policy, native_owner
from impls.plan import RoutingPlan
from impls.router import Router

__all__ = ["ExpertParallel", "data_parallel", "expert_parameter_names", "full_layer", "seeded_experts"]

Routing = Literal["global", "local"]


# ---------------------------------------------------------------------------------- collectives


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "ExpertParallel needs torch.distributed initialized (init_process_group, or torchrun)"
        )
    return dist.get_world_size(group), dist.get_rank(group)


class _AllGatherRows(torch.autograd.Function):
    """``[Tmax, ...]`` on every rank -> ``[W, Tmax, ...]``; backward: all-to-all, then sum (no
    reduce-scatter needed, so it runs on gloo)."""

    @staticmethod
    def forward(ctx, x, group, world):  # type: ignore[override]
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out.sum(0), None, None


class _AllToAllRows(torch.autograd.Function):
    """``all_to_all_single`` of rows with uneven splits; backward: the reverse exchange."""

    @staticmethod
    def forward(ctx, x, send, recv, group):  # type: ignore[override]
        ctx.group, ctx.send, ctx.recv = group, send, recv
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _AllToAllRows.apply(grad.contiguous(), ctx.recv, ctx.send, ctx.group), None, None, None


def _gather_rows(x: torch.Tensor, sizes: list[int], group, world: int, differentiable: bool) -> torch.Tensor:
    """Concatenate every rank's ``x`` (``sizes[r]`` rows each) in rank order, on every rank."""
    tmax = max(sizes)
    pad = tmax - x.shape[0]
    xp = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
    if differentiable:
        stacked = _AllGatherRows.apply(xp, group, world)
    else:
        parts = [torch.empty_like(xp) for _ in range(world)]
        dist.all_gather(parts, xp.contiguous(), group=group)
        stacked = torch.stack(parts)
    if all(s == tmax for s in sizes):
        return stacked.reshape(world * tmax, *x.shape[1:])
    return torch.cat([stacked[r, : sizes[r]] for r in range(world)])


def _gather_ids(v: torch.Tensor, sizes: list[int], group, world: int) -> torch.Tensor:
    if v.dtype == torch.bool:
        return _gather_rows(v.to(torch.uint8), sizes, group, world, False).bool()
    return _gather_rows(v, sizes, group, world, False)


# ---------------------------------------------------------------------------------- the module


class ExpertParallel(nn.Module):
    """An ``MoELayer`` whose routed experts are sharded over the ranks of ``process_group``.

    Args:
        layer: a full ``MoELayer`` with the same weights on every rank (e.g. built after
            ``torch.manual_seed`` with the same seed everywhere); its router, shared experts and
            output bias are taken over, its routed experts sliced. The layer itself is not changed.
        process_group: the expert-parallel group (default: the whole world).
        routing: ``"global"`` (route the concatenated batch on every rank; exact) or ``"local"``.
        policy: a dispatch policy (``impls.parallel.policies``) or its name, with ``policy_options``.
        grad_reduction: ``"mean"`` (DDP's averaging) or ``"sum"``; see the module docstring.
        seed: base seed of the shared random stream of global routing in training (default: drawn
            on rank 0 and broadcast).
        init_seed: for a layer built with ``materialize_experts=False`` (what ``build()`` does): the
            seed of ``seeded_experts``, which draws this rank's experts.

    ``forward(x, padding_mask=None, *, token_modality=None, **inputs)`` takes this rank's tokens
    (``[batch, seq, D]`` or ``[T, D]``; ranks may pass different numbers, zero included, but the
    same ``seq``) and returns ``(mixture, plan)`` like ``MoELayer``: the mixture of this rank's
    tokens and the plan of this rank's tokens (with the global batch's losses, see
    ``grad_reduction``). ``token_modality`` (``bool``, True = vision token) feeds ReaLB.
    ``last_assignment`` is the step's ``Assignment``.
    """

    def __init__(
        self,
        layer: MoELayer,
        process_group: Any = None,
        *,
        routing: Routing = "global",
        policy: str | DispatchPolicy | None = None,
        grad_reduction: Literal["mean", "sum"] = "mean",
        seed: int | None = None,
        init_seed: int | None = None,
        **policy_options: Any,
    ):
        super().__init__()
        if not isinstance(layer, MoELayer):
            raise TypeError(f"ExpertParallel: layer must be an MoELayer, got {type(layer).__name__}")
        if getattr(layer.router, "plan_type", "tokens") != "tokens":
            raise TypeError(
                f"ExpertParallel: router {type(layer.router).__name__} returns "
                f"{layer.router.plan_type!r} plans (mixtures of all experts), which expert "
                "parallelism cannot shard; use a token-routing router"
            )
        if routing not in ("global", "local"):
            raise ValueError(f"ExpertParallel: routing must be 'global' or 'local', got {routing!r}")
        if grad_reduction not in ("mean", "sum"):
            raise ValueError(
                f"ExpertParallel: grad_reduction must be 'mean' or 'sum', got {grad_reduction!r}"
            )
        _world(process_group)
        if process_group is None:
            # a communicator of its own, so that its exchanges (forward and backward) never
            # interleave with other collectives on the default group (DDP's gradient buckets)
            process_group = dist.new_group(backend=dist.get_backend())
        self.process_group = process_group
        self.world_size, self.rank = _world(process_group)
        E, W = layer.num_experts, self.world_size
        try:
            self.owner_E = native_owner(E, W)
        except ValueError as exc:
            raise ValueError(f"ExpertParallel: {exc}") from None
        self.routing: Routing = routing
        self.grad_reduction = grad_reduction
        self.policy = build_policy(policy, **policy_options)
        self.num_experts, self.d_model, self.d_hidden = E, layer.d_model, layer.d_hidden
        self.experts_per_rank = E // W
        self.first_expert = self.rank * self.experts_per_rank
        self.router: Router = layer.router
        self.shared = layer.shared
        self.output_bias = layer.output_bias
        self.expert_impl = layer.expert_impl
        self.loss_coefficients = dict(layer.loss_coefficients)
        self.activation = layer.activation
        full = layer.experts
        w = full.w_in_EDF
        device = self.router.gate.weight.device if w.is_meta else w.device
        self.experts = _experts_like(full, self.experts_per_rank, device)
        if w.is_meta:  # built sharded: every expert drawn from its own seed, whatever the world size
            seeded_experts(self.experts, self._init_seed(init_seed), first_expert=self.first_expert)
        else:
            self.load_full_experts(full)
        if grad_reduction == "mean" and W > 1:
            for p in self.experts.parameters():
                p.register_hook(lambda g, w=W: g / w)
        if seed is None:
            s = torch.randint(0, 2**62, (1,), dtype=torch.long)
            s = s.to(self._comm_device())
            dist.broadcast(s, src=dist.get_global_rank(process_group, 0), group=process_group)
            seed = int(s.item())
        self._seed, self._calls = int(seed), 0
        self.router._ep_global_stats = routing == "global"  # step_routers() must not sum again
        self.last_assignment: Assignment | None = None

    @classmethod
    def build(
        cls,
        d_model: int,
        d_hidden: int,
        num_experts: int | None = None,
        router: str | Router = "topk",
        process_group: Any = None,
        *,
        seed: int = 0,
        routing: Routing = "global",
        policy: str | DispatchPolicy | None = None,
        grad_reduction: Literal["mean", "sum"] = "mean",
        policy_options: Mapping[str, Any] | None = None,
        **layer_options: Any,
    ) -> ExpertParallel:
        """Build the layer sharded: no rank ever holds all experts.

        The router, shared experts and output bias are drawn after ``torch.manual_seed(seed)`` (the
        same on every rank); routed expert ``e`` is drawn from its own seed (``seeded_experts``), so
        the weights do not depend on the world size and ``full_layer(...)`` with the same arguments
        is the single-process layer this one shards. ``layer_options`` go to ``MoELayer``.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layer = MoELayer(
                d_model, d_hidden, num_experts, router, materialize_experts=False, **layer_options
            )
        return cls(
            layer,
            process_group,
            routing=routing,
            policy=policy,
            grad_reduction=grad_reduction,
            init_seed=seed,
            **dict(policy_options or {}),
        )

    @staticmethod
    def _init_seed(seed: int | None) -> int:
        if seed is None:
            raise ValueError(
                "ExpertParallel: a layer with unmaterialized experts needs init_seed= (use build())"
            )
        return seed

    # ------------------------------------------------------------------ weights
    def _comm_device(self) -> torch.device:
        backend = dist.get_backend(self.process_group)
        if backend in ("nccl", "xccl") and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def local_experts(self) -> range:
        """Global ids of the experts this rank owns."""
        return range(self.first_expert, self.first_expert + self.experts_per_rank)

    @torch.no_grad()
    def load_full_experts(self, full: GroupedExperts) -> None:
        """Copy this rank's slice of a full layer's routed experts."""
        if full.num_experts != self.num_experts:
            raise ValueError(
                f"load_full_experts: {full.num_experts} experts, this layer has {self.num_experts}"
            )
        sl = slice(self.first_expert, self.first_expert + self.experts_per_rank)
        for name in ("w_in_EDF", "w_out_EFD", "b_in_EF", "b_out_ED"):
            mine, theirs = getattr(self.experts, name), getattr(full, name)
            if mine is not None and theirs is not None:
                mine.copy_(theirs[sl])

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """The sharded parameters (each rank holds different values; never all-reduce them)."""
        return self.experts.parameters()

    def replicated_parameters(self) -> Iterator[nn.Parameter]:
        """Router, shared experts, output bias: one copy per rank, reduced like data-parallel weights."""
        sharded = {id(p) for p in self.experts.parameters()}
        return (p for p in self.parameters() if id(p) not in sharded)

    @torch.no_grad()
    def all_reduce_grads(self) -> None:
        """Reduce the replicated parameters' gradients over the group (sum or mean per ``grad_reduction``);
        for training without ``DistributedDataParallel``."""
        for p in self.replicated_parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.process_group)
                if self.grad_reduction == "mean":
                    p.grad /= self.world_size

    def step(self) -> None:
        """The router's between-step update (after ``optimizer.step()``): with global routing its
        statistics are already global, with local routing they are summed over the group."""
        self.router.on_optimizer_step(None if self.routing == "global" else self.process_group)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        token_modality: torch.Tensor | None = None,
        **inputs: torch.Tensor,
    ) -> tuple[torch.Tensor, RoutingPlan]:
        x_TD, mask_T, seq = MoELayer._flatten(self, x, padding_mask)  # type: ignore[arg-type]
        if token_modality is not None:
            if token_modality.dtype != torch.bool or tuple(token_modality.shape) != tuple(x.shape[:-1]):
                raise ValueError(
                    f"ExpertParallel: token_modality must be bool shaped {list(x.shape[:-1])} (True = vision)"
                )
            token_modality = token_modality.reshape(-1)
        W, group = self.world_size, self.process_group
        dev = self._comm_device()
        meta = torch.tensor(
            [x_TD.shape[0], -1 if seq is None else seq, x.shape[0] if x.dim() == 3 else 0, mask_T is not None]
        )
        metas = [torch.empty_like(meta, device=dev) for _ in range(W)]
        dist.all_gather(metas, meta.to(dev), group=group)
        meta_W = torch.stack(metas).cpu()
        sizes = meta_W[:, 0].tolist()
        seqs = {s for s, t in zip(meta_W[:, 1].tolist(), sizes, strict=True) if t > 0}
        if len(seqs) > 1:
            raise ValueError(f"ExpertParallel: ranks passed different sequence lengths {sorted(seqs)}")
        anchor = None
        if self.routing == "global":
            plan, counts_RE, vision_RE, anchor = self._route_global(
                x, x_TD, mask_T, seq, sizes, meta_W, inputs, token_modality
            )
        else:
            plan = self.router(x_TD, mask_T, sequence_length=seq, **MoELayer._flat_inputs(self, x, inputs))  # type: ignore[arg-type]
            counts_RE, vision_RE = self._exchange_counts(plan, token_modality)
        a = self.policy.assign(counts_RE, vision_counts_RE=vision_RE)
        self.last_assignment = a
        out_TD = self._mix(x_TD, plan, a)
        if anchor is not None and x_TD.shape[0] == 0:
            # a rank without tokens still joins the backward of the routing all-gather
            out_TD = out_TD + anchor.sum().to(out_TD.dtype) * 0
        out_TD = MoELayer._add_shared(self, out_TD, x_TD, mask_T)  # type: ignore[arg-type]
        return out_TD.view(x.shape), plan

    def _rng(self):
        """The shared random stream of global routing (training only)."""
        devices = (
            [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        )
        return torch.random.fork_rng(devices=devices)

    def _route_global(self, x, x_TD, mask_T, seq, sizes, meta_W, inputs, modality):
        W, group, r = self.world_size, self.process_group, self.rank
        x_all = _gather_rows(x_TD, sizes, group, W, differentiable=True)
        mask_all = None
        if bool(meta_W[:, 3].any()):  # any rank with a mask: every rank passes one
            m = (
                mask_T
                if mask_T is not None
                else torch.ones(x_TD.shape[0], dtype=torch.bool, device=x_TD.device)
            )
            mask_all = _gather_ids(m, sizes, group, W)
        seq_len = None if seq is None else seq
        batch_sizes = meta_W[:, 2].tolist()
        flat = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(x.shape[:-1]):
                flat[k] = _gather_ids(v.reshape(-1), sizes, group, W)
            elif isinstance(v, torch.Tensor) and x.dim() == 3 and v.dim() == 1 and v.shape[0] == x.shape[0]:
                flat[k] = _gather_ids(v, batch_sizes, group, W)
            else:
                raise ValueError(
                    f"ExpertParallel: routing input {k!r} must be shaped like x without its last axis "
                    f"{list(x.shape[:-1])} or [batch]"
                )
        if self.router.training:
            self._calls += 1
            with self._rng():
                torch.manual_seed((self._seed + self._calls) % (2**63 - 1))
                plan_all = self.router(x_all, mask_all, sequence_length=seq_len, **flat)
        else:
            plan_all = self.router(x_all, mask_all, sequence_length=seq_len, **flat)
        off = sum(sizes[:r])
        E = self.num_experts
        rank_T = torch.repeat_interleave(
            torch.arange(W, device=x_TD.device), torch.tensor(sizes, device=x_TD.device)
        )
        kept = plan_all.keep_TK & plan_all.selected_TK
        key = (rank_T[:, None] * E + plan_all.expert_ids_TK.clamp_min(0))[kept]
        counts_RE = torch.bincount(key, minlength=W * E).view(W, E)
        vision_RE = None
        if modality is not None or isinstance(self.policy, _needs_modality()):
            mod = (
                modality
                if modality is not None
                else torch.ones(x_TD.shape[0], dtype=torch.bool, device=x_TD.device)
            )
            mod_all = _gather_ids(mod, sizes, group, W)
            vk = (rank_T[:, None] * E + plan_all.expert_ids_TK.clamp_min(0))[kept & mod_all[:, None]]
            vision_RE = torch.bincount(vk, minlength=W * E).view(W, E).cpu()
        plan = _slice_plan(plan_all, off, sizes[r], 1.0 / W if self.grad_reduction == "sum" else 1.0)
        return plan, counts_RE.cpu(), vision_RE, plan_all.weights_TK

    def _exchange_counts(self, plan: RoutingPlan, modality):
        W, E, dev = self.world_size, self.num_experts, self._comm_device()
        kept = plan.keep_TK & plan.selected_TK
        c = torch.bincount(plan.expert_ids_TK.clamp_min(0)[kept], minlength=E)
        rows = [c]
        if modality is not None:
            rows.append(
                torch.bincount(plan.expert_ids_TK.clamp_min(0)[kept & modality[:, None]], minlength=E)
            )
        mine = torch.stack(rows).to(dev)
        parts = [torch.empty_like(mine) for _ in range(W)]
        dist.all_gather(parts, mine, group=self.process_group)
        allc = torch.stack(parts).cpu()  # [W, 1 or 2, E]
        return allc[:, 0], (allc[:, 1] if modality is not None else None)

    # ------------------------------------------------------------------ dispatch / combine
    def _mix(self, x_TD: torch.Tensor, plan: RoutingPlan, a: Assignment) -> torch.Tensor:
        W, E, r, group = self.world_size, self.num_experts, self.rank, self.process_group
        dev = x_TD.device
        d = make_dispatch(plan)
        xc = x_TD.to(self.experts.w_in_EDF.dtype)
        # [N + 1, D], kept rows first, grouped by expert (no rows at all for a rank without tokens)
        x_N = permute(xc, d) if x_TD.shape[0] else xc
        rows_RER = a.rows_RER
        mine_EW = rows_RER[r]  # [E, W]
        n_kept = int(mine_EW.sum())
        # destination of every kept row: its expert's chunks, cut in order
        counts_E = torch.from_numpy(mine_EW.sum(1)).to(dev)
        start_E = torch.cumsum(counts_E, 0) - counts_E
        n = torch.arange(n_kept, device=dev)
        e_n = torch.repeat_interleave(torch.arange(E, device=dev), counts_E, output_size=n_kept)
        pos_n = n - start_E[e_n]
        cum_EW = torch.from_numpy(np.cumsum(mine_EW, 1)).to(dev)
        dst_n = (pos_n[:, None] >= cum_EW[e_n]).sum(1)
        order = torch.argsort(dst_n * E + e_n, stable=True)
        send = mine_EW.sum(0).tolist()
        recv = rows_RER[:, :, r].sum(1).tolist()
        got = _AllToAllRows.apply(x_N[:n_kept].index_select(0, order), send, recv, group)
        # the experts this rank computes: its own, then the others it was given rows of
        here_E = rows_RER[:, :, r].sum(0)
        foreign = [e for e in np.nonzero(here_E)[0].tolist() if self.owner_E[e] != r]
        slot_E = np.full(E, -1, dtype=np.int64)
        slot_E[list(self.local_experts)] = np.arange(self.experts_per_rank)
        slot_E[foreign] = self.experts_per_rank + np.arange(len(foreign))
        # received rows: by source, then expert, then position
        src_counts = torch.from_numpy(rows_RER[:, :, r].reshape(-1)).to(dev)  # [W * E], source-major
        e_recv = torch.repeat_interleave(
            torch.arange(E, device=dev).repeat(W), src_counts, output_size=sum(recv)
        )
        slot_recv = torch.from_numpy(slot_E).to(dev)[e_recv]
        order2 = torch.argsort(slot_recv, stable=True)
        n_slots = self.experts_per_rank + len(foreign)
        counts_S = torch.bincount(slot_recv, minlength=n_slots)
        weights = self._weights_for(a, foreign)
        xs = got.index_select(0, order2)
        low = bool(a.low_precision_R[r])
        y_sorted = self._compute(xs, counts_S, weights, low)
        y_recv = _unsort(y_sorted, order2)
        back = _AllToAllRows.apply(y_recv, recv, send, group)
        y_rows = _unsort(back, order)
        if x_TD.shape[0] == 0:  # still part of the graph, so this rank joins the backward exchanges
            return x_TD.new_zeros(x_TD.shape) + back.sum().to(x_TD.dtype) * 0
        y_N = torch.cat([y_rows, y_rows.new_zeros(x_N.shape[0] - n_kept, y_rows.shape[1])])
        return combine(y_N, d, plan.weights_TK, x_TD.dtype)

    def _weights_for(self, a: Assignment, foreign: list[int]):
        """This rank's expert weights stacked with the ones sent to it for the step."""
        ex = self.experts
        local = [ex.w_in_EDF, ex.w_out_EFD, ex.b_in_EF, ex.b_out_ED]
        transfers = a.transfers
        if not transfers:
            return local
        W, r, group = self.world_size, self.rank, self.process_group
        names = [i for i, t in enumerate(local) if t is not None]
        widths = [local[i][0].numel() for i in names]
        packed = torch.cat([local[i].reshape(self.experts_per_rank, -1) for i in names], 1)
        # experts of mine that each rank computes without owning them, in expert order
        need = {q: sorted(e for e, q2 in transfers if q2 == q and self.owner_E[e] == r) for q in range(W)}
        idx = [e - self.first_expert for q in range(W) for e in need[q]]
        send = [len(need[q]) for q in range(W)]
        recv = [sum(1 for e, q in transfers if q == r and self.owner_E[e] == s) for s in range(W)]
        out = packed.index_select(0, torch.tensor(idx, dtype=torch.long, device=packed.device))
        got = _AllToAllRows.apply(out, send, recv, group)  # [len(foreign), sum(widths)], expert order
        if got.shape[0] != len(foreign):  # pragma: no cover - guarded by Assignment
            raise RuntimeError("ExpertParallel: weight exchange does not match the assignment")
        pieces = torch.split(got, widths, dim=1)
        full = list(local)
        for i, piece in zip(names, pieces, strict=True):
            full[i] = torch.cat([local[i], piece.reshape(len(foreign), *local[i].shape[1:])])
        return full

    def _compute(
        self, xs: torch.Tensor, counts_S: torch.Tensor, weights, low_precision: bool
    ) -> torch.Tensor:
        w_in, w_out, b_in, b_out = weights
        if low_precision:  # ReaLB: this rank computes in emulated NVFP4 this step
            xs = fake_nvfp4(xs)
            w_in = fake_nvfp4(w_in.transpose(1, 2)).transpose(1, 2)
            w_out = fake_nvfp4(w_out.transpose(1, 2)).transpose(1, 2)
        if xs.shape[0] == 0:
            # nothing to compute here; still connected to the received rows and the weights, so
            # that this rank joins the backward exchanges of both
            return xs.new_zeros(0, self.d_model) + 0 * (w_out.sum() + xs.sum())
        N = xs.shape[0]
        d = Dispatch(
            token_N=torch.zeros(N + 1, dtype=torch.long, device=xs.device),
            slot_pos_TK=torch.zeros(0, 1, dtype=torch.long, device=xs.device),
            slot_N=torch.zeros(0, dtype=torch.long, device=xs.device),
            gather_TK=torch.zeros(0, 1, dtype=torch.long, device=xs.device),
            counts_E=counts_S,
            valid_N=torch.ones(N, dtype=torch.bool, device=xs.device),
            keep_TK=torch.zeros(0, 1, dtype=torch.bool, device=xs.device),
            capacity=None,
        )
        return self.experts.forward_weights(xs, d, (w_in, w_out, b_in, b_out), self.expert_impl)

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self) -> dict[str, Any]:
        """The layer's state dict with the same keys as ``MoELayer.state_dict()``, the routed experts
        as ``DTensor``s sharded on the expert axis over the group's device mesh: what
        ``torch.distributed.checkpoint.save`` writes and ``load`` fills in place, resharding to
        another world size (or to a full single-process ``MoELayer``)."""
        from torch.distributed.tensor import DTensor, Shard

        mesh = self._mesh()
        sd: dict[str, Any] = {}
        for k, v in self.state_dict(keep_vars=False).items():
            if k.startswith("experts."):
                sd[k] = DTensor.from_local(v, mesh, [Shard(0)], run_check=False)
            else:
                sd[k] = v
        return sd

    def load_sharded_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load what ``sharded_state_dict()`` returned (after ``torch.distributed.checkpoint.load``)."""
        from torch.distributed.tensor import DTensor

        local = {k: (v.to_local() if isinstance(v, DTensor) else v) for k, v in state_dict.items()}
        self.load_state_dict(local)

    def _mesh(self):
        from torch.distributed.device_mesh import DeviceMesh

        if getattr(self, "_device_mesh", None) is None:
            ranks = dist.get_process_group_ranks(self.process_group)
            self._device_mesh = DeviceMesh(self._comm_device().type, ranks)
        return self._device_mesh

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}/{self.world_size}, experts={self.first_expert}.."
            f"{self.first_expert + self.experts_per_rank - 1} of {self.num_experts}, "
            f"routing={self.routing!r}, policy={self.policy.name!r}, grad_reduction={self.grad_reduction!r}"
        )


@torch.no_grad()
def seeded_experts(experts: GroupedExperts, seed: int, first_expert: int = 0) -> GroupedExperts:
    """Initialize every expert of ``experts`` from its own generator, seeded by ``(seed, expert id)``
    (``first_expert`` is the id of its first expert): the same values whichever rank holds the
    expert. Same distribution as ``GroupedExperts.reset_parameters`` (uniform, fan-in)."""
    b_in, b_out = 1 / math.sqrt(experts.d_model), 1 / math.sqrt(experts.d_hidden)
    device = experts.w_in_EDF.device
    for i in range(experts.num_experts):  # initialization, once
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + first_expert + i)
        experts.w_in_EDF[i].uniform_(-b_in, b_in, generator=g)
        experts.w_out_EFD[i].uniform_(-b_out, b_out, generator=g)
        if experts.b_in_EF is not None and experts.b_out_ED is not None:
            experts.b_in_EF[i].uniform_(-b_in, b_in, generator=g)
            experts.b_out_ED[i].uniform_(-b_out, b_out, generator=g)
    return experts


def full_layer(
    d_model: int,
    d_hidden: int,
    num_experts: int | None = None,
    router: str | Router = "topk",
    *,
    seed: int = 0,
    **layer_options: Any,
) -> MoELayer:
    """The single-process ``MoELayer`` that ``ExpertParallel.build`` with the same arguments shards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = MoELayer(d_model, d_hidden, num_experts, router, materialize_experts=False, **layer_options)
    layer.experts = _experts_like(layer.experts, layer.num_experts, layer.router.gate.weight.device)
    seeded_experts(layer.experts, seed)
    return layer


def _experts_like(experts: GroupedExperts, num_experts: int, device: torch.device) -> GroupedExperts:
    """``num_experts`` new experts with the shapes, activation, biases and dtype of ``experts``."""
    return GroupedExperts(
        num_experts,
        experts.d_model,
        experts.d_hidden,
        experts.activation,  # type: ignore[arg-type]
        bias=experts.has_bias,
        swiglu_alpha=experts.swiglu_alpha,
        swiglu_limit=experts.swiglu_limit,
        dtype=experts.w_in_EDF.dtype,
        device=device,
    )


def _needs_modality():
    from impls.parallel.policies import ReaLB

    return ReaLB


def _unsort(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows back to the order before ``index_select(order)`` (a gather through the inverse permutation)."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return y.index_select(0, inv)


def _slice_plan(plan: RoutingPlan, off: int, n: int, loss_scale: float) -> RoutingPlan:
    """This rank's rows of the global plan; losses (of the whole batch) scaled by ``loss_scale``."""
    sl = slice(off, off + n)
    losses = {k: v * loss_scale if loss_scale != 1.0 else v for k, v in plan.losses.items()}
    return dataclasses.replace(
        plan,
        expert_ids_TK=plan.expert_ids_TK[sl],
        weights_TK=plan.weights_TK[sl],
        keep_TK=plan.keep_TK[sl],
        scores_TE=plan.scores_TE[sl],
        logits_TE=plan.logits_TE[sl],
        token_mask_T=None if plan.token_mask_T is None else plan.token_mask_T[sl],
        losses=losses,
    )


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of every sharded expert parameter inside ``model`` (for
    ``DistributedDataParallel``'s ignore list: those must not be averaged over ranks)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, ExpertParallel):
            prefix = f"{name}.experts." if name else "experts."
            out += [prefix + n for n, _ in mod.experts.named_parameters()]
    return out


def data_parallel(model: nn.Module, process_group: Any = None, **ddp_options: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` that averages every parameter except the sharded experts
    of the ``ExpertParallel`` layers inside it (DDP's own ignore list)."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
    return DistributedDataParallel(model, process_group=process_group, **ddp_options)
