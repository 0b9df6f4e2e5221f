"""Benchmark the MoE layer against a dense MLP of equal active FLOPs and against the naive loop.

For one shape (``T`` tokens, width ``D``, expert hidden ``F``, ``E`` experts, top-``k``) it times
a training step (forward + backward with a dense upstream gradient) of

* ``dense``: an MLP of hidden width ``k * F`` (the same active FLOPs as the MoE layer),
* ``moe``: ``impls.MoELayer`` (router, sort-based dispatch, grouped matmul, combine,
  auxiliary loss),
* ``loop``: ``impls.oracle.moe_loop_reference()`` on the same layer (the naive per-expert loop),
* with ``--gemm-floors``, the expert matmuls alone on tokens already grouped by expert, as the
  layer runs them and as the loop runs them: the floor under each method, and so a bound on the
  loop/moe speed-up that any dispatch could reach at this shape,

interleaved repeat by repeat (so drifting clocks hit all three alike; each sample is one step
between two device syncs, or ``--steps-per-sample`` steps back to back as in a training loop) and
reports medians, the ratio ``moe / dense``, the loop's slowdown, and memory: peak CUDA memory on
GPU, peak resident set growth on CPU (Linux), and on both the bytes autograd saved for backward. Then it times
every router alone (forward, and forward + backward).

With ``--compile`` the layer (and the dense baseline) are also timed under ``torch.compile``,
side by side with eager (rows ``moe compiled``, ``dense compiled``). With ``--vs-hf`` it times the
layer against Hugging Face transformers' own Mixtral-style block (``MixtralSparseMoeBlock``, SwiGLU
experts, top-k renormalized softmax) on the same weights (``impls.hf.from_hf``), once per experts
implementation transformers offers (``eager``, ``grouped_mm``, ``batched_mm``; one that would need
more than ``--hf-memory-gib`` of gathered weights is skipped and says so), forward + backward,
interleaved in one run, plus the layer's grouped-GEMM floor (its expert matmuls alone).

Examples::

    python scripts/bench_moe.py                                   # CPU fp32 targets shape
    python scripts/bench_moe.py --gemm-floors --routers ''        # how much is left to win
    python scripts/bench_moe.py --device cuda --dtype bfloat16 --profile 25 --routers ''  # op by op
    python scripts/bench_moe.py --device cuda --dtype bfloat16 --tokens 16384 --d-model 2048 --d-hidden 8192
    python scripts/bench_moe.py --device cuda --dtype bfloat16 --tokens 16384 --d-model 2048 \
        --d-hidden 1024 --experts 64 --k 16          # fine-grained: same active FLOPs as E=8, k=2
    python scripts/bench_moe.py --device cuda --dtype bfloat16 --steps-per-sample 5   # training-loop timing
    python scripts/bench_moe.py --routers topk switch_base deepseek_v3 --no-loop
    python scripts/bench_moe.py --vs-hf --compile --activation swiglu --d-hidden 1024 --routers ''
    python scripts/bench_moe.py --vs-hf --activation swiglu --d-hidden 256 --experts 64 --k 8 \
        --dtype bfloat16 --routers ''
"""

from __future__ import annotations

import _checkout  # noqa: F401  (first: this checkout's packages and data)

# isort: split

import argparse
import contextlib
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import impls
from impls.layer import make_dispatch, permute
from impls.oracle import moe_loop_reference

log = logging.getLogger("bench_moe")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="activation and weight dtype")
    p.add_argument("--tokens", type=int, default=4096, help="tokens T per step (default 4096)")
    p.add_argument("--d-model", type=int, default=512, help="model width D (default 512)")
    p.add_argument("--d-hidden", type=int, default=2048, help="expert hidden width F (default 2048)")
    p.add_argument("--experts", type=int, default=8, help="routed experts E (default 8)")
    p.add_argument("--k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument(
        "--activation", default="gelu", choices=["gelu", "relu", "swiglu", "geglu"], help="expert MLP type"
    )
    p.add_argument(
        "--compile", action="store_true", help="also time the layer and the dense MLP under torch.compile"
    )
    p.add_argument(
        "--vs-hf",
        action="store_true",
        help="time the layer against transformers' MixtralSparseMoeBlock on the same weights, once per "
        "experts implementation (needs transformers and --activation swiglu)",
    )
    p.add_argument(
        "--hf-memory-gib",
        type=float,
        default=4.0,
        help="skip a transformers experts implementation whose gathered weights would exceed this "
        "(batched_mm copies one expert's weights per token and slot; default 4 GiB)",
    )
    p.add_argument("--only-hf", action="store_true", help="with --vs-hf: skip the dense/loop table")
    p.add_argument("--router", default="topk", help="router or preset inside the timed layer (default topk)")
    p.add_argument("--expert-impl", default="auto", choices=["auto", "grouped_mm", "bmm"])
    p.add_argument(
        "--extra-impls",
        nargs="*",
        default=[],
        choices=["auto", "grouped_mm", "bmm"],
        help="also time the layer with these expert implementations (rows 'moe[impl]')",
    )
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per method (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs per method")
    p.add_argument(
        "--steps-per-sample",
        type=int,
        default=1,
        help="consecutive steps per timed sample, with no sync between them, as in a training loop "
        "(hides kernel-launch latency behind queued GPU work; the time reported is per step)",
    )
    p.add_argument("--no-loop", action="store_true", help="skip the naive loop (slow on big shapes)")
    p.add_argument(
        "--gemm-floors",
        action="store_true",
        help="also time the expert matmuls alone, on tokens already grouped by expert, as the layer "
        "runs them ('experts only') and as the loop runs them ('loop experts only'): no router, "
        "no gather, no combine. Neither method can beat its own floor, so loop / 'experts only' "
        "bounds the loop/moe speed-up any dispatch could reach at this shape",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="ROWS",
        help="after timing, profile one sample of the moe and dense steps with torch.profiler and "
        "print their ROWS most expensive ops (device time on GPU, CPU time on CPU)",
    )
    p.add_argument(
        "--routers",
        nargs="*",
        default=None,
        help="routers/presets to time alone (default: every registered router; '' for none)",
    )
    p.add_argument(
        "--router-tokens", type=int, default=None, help="tokens for router-only timing (default T)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_peak_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class SavedBytes:
    """Bytes autograd saves for backward during a forward (activation memory)."""

    def __init__(self) -> None:
        self.total = 0
        self._seen: set[int] = set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.total += t.untyped_storage().nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def measure_memory(
    step: Callable[[SavedBytes | None], None], device: torch.device
) -> tuple[float | None, float]:
    """``(peak MiB or None, saved-for-backward MiB)`` of one step."""
    saved = SavedBytes()
    peak = None
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(saved)
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    elif _rss_peak_reset():
        base = _rss_kib("VmRSS")
        step(saved)
        hwm = _rss_kib("VmHWM")
        if base is not None and hwm is not None:
            peak = max(hwm - base, 0) / 1024
    else:
        step(saved)
    return peak, saved.total / 2**20


def timed(fn: Callable[[], None], device: torch.device) -> float:
    return timed_both(fn, device)[0]


def timed_both(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` of one call."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


# ------------------------------------------------------------------------------ workloads


class DenseMLP(torch.nn.Module):
    """The equal-FLOPs baseline: ``act(x W1) W2`` with hidden width ``k * F``."""

    def __init__(self, d_model: int, d_hidden: int, activation: str, dtype, device):
        super().__init__()
        width_in = 2 * d_hidden if activation in ("swiglu", "geglu") else d_hidden
        self.activation = activation
        self.w1 = torch.nn.Parameter(
            torch.randn(d_model, width_in, dtype=dtype, device=device) / d_model**0.5
        )
        self.w2 = torch.nn.Parameter(
            torch.randn(d_hidden, d_model, dtype=dtype, device=device) / d_hidden**0.5
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w1
        if self.activation in ("swiglu", "geglu"):
            g, u = h.chunk(2, dim=-1)
            h = (F.silu(g) if self.activation == "swiglu" else F.gelu(g)) * u
        else:
            h = F.relu(h) if self.activation == "relu" else F.gelu(h)
        return h @ self.w2


def build(args, device, dtype):
    torch.manual_seed(args.seed)
    T, D, Fh, E, k = args.tokens, args.d_model, args.d_hidden, args.experts, args.k
    layer = impls.MoELayer(
        D,
        Fh,
        E,
        router=args.router,
        k=k,
        activation=args.activation,
        expert_impl=args.expert_impl,
        dtype=dtype,
        device=device,
    )
    dense = DenseMLP(D, k * Fh, args.activation, dtype, device)
    x = torch.randn(T, D, dtype=dtype, device=device, requires_grad=True)
    g = torch.randn(T, D, dtype=dtype, device=device)
    coefs = {name: 0.01 for name in layer.route(x.detach()).losses}
    return layer, dense, x, g, coefs


def make_steps(layer, dense, x, g, coefs):
    def dense_step(saved: SavedBytes | None = None) -> None:
        with saved.hooks() if saved else contextlib.nullcontext():
            y = dense(x)
        y.backward(g)

    def moe_step(saved: SavedBytes | None = None) -> None:
        with saved.hooks() if saved else contextlib.nullcontext():
            y, plan = layer(x)
            aux = plan.aux_loss(coefs)
        torch.autograd.backward([y, aux], [g, None])  # the same upstream gradient as the dense step

    def loop_step(saved: SavedBytes | None = None) -> None:
        with saved.hooks() if saved else contextlib.nullcontext():
            y, plan = moe_loop_reference(layer, x)
            aux = plan.aux_loss(coefs)
        torch.autograd.backward([y, aux], [g, None])

    return {"dense": dense_step, "moe": moe_step, "loop": loop_step}


def make_gemm_floor_steps(layer, x, g):
    """The expert matmuls of one step with everything around them taken away.

    The tokens are routed and grouped by expert once, outside the timed step; the steps run the
    layer's grouped experts (``experts only``) or the loop's per-expert matmuls (``loop experts
    only``) forward and backward, with the matching slice of the upstream gradient.
    """
    with torch.no_grad():
        plan = layer.route(x)
        d = make_dispatch(plan)
        xp = permute(x.to(layer.experts.w_in_EDF.dtype), d)
    xp.requires_grad_(True)
    gp = permute(g, d)
    counts = d.counts_E.tolist()
    rows = sum(counts)
    parts = [t.detach().requires_grad_(True) for t in xp[:rows].split(counts)]
    gparts = gp[:rows].split(counts)

    def grouped_step(saved: SavedBytes | None = None) -> None:
        with saved.hooks() if saved else contextlib.nullcontext():
            y = layer.experts(xp, d, layer.expert_impl)
        y[:rows].backward(gp[:rows])

    def loop_gemm_step(saved: SavedBytes | None = None) -> None:
        with saved.hooks() if saved else contextlib.nullcontext():
            ys = [layer.experts.expert_forward(e, xe) for e, xe in enumerate(parts) if xe.numel()]
        gs = [ge for ge, xe in zip(gparts, parts, strict=True) if xe.numel()]
        torch.autograd.backward(ys, gs)

    return {"experts only": grouped_step, "loop experts only": loop_gemm_step}


def zero_grads(*modules_and_tensors) -> None:
    for m in modules_and_tensors:
        if isinstance(m, torch.Tensor):
            m.grad = None
        else:
            m.zero_grad(set_to_none=True)


def compiled_steps(layer, dense, x, g, coefs):
    """The moe and dense steps with ``torch.compile``d modules (the same weights)."""
    fullgraph = layer.router.compile_break is None
    c_layer = torch.compile(layer, fullgraph=fullgraph)
    c_dense = torch.compile(dense, fullgraph=True)

    def dense_step(saved: SavedBytes | None = None) -> None:
        with saved.hooks() if saved else contextlib.nullcontext():
            y = c_dense(x)
        y.backward(g)

    def moe_step(saved: SavedBytes | None = None) -> None:
        with saved.hooks() if saved else contextlib.nullcontext():
            y, plan = c_layer(x)
            aux = plan.aux_loss(coefs)
        torch.autograd.backward([y, aux], [g, None])

    return {"moe compiled": moe_step, "dense compiled": dense_step}


def interleaved(steps: dict[str, Callable], args, device, reset: Callable[[], None]):
    """Warm every step up, then time them repeat by repeat in turn: ``(wall, cpu)`` lists by name."""
    for step in tqdm(steps.values(), desc="warm-up", disable=len(steps) < 2):
        for _ in range(args.warmup):
            step()
            reset()
    times: dict[str, list[float]] = {n: [] for n in steps}
    cpu: dict[str, list[float]] = {n: [] for n in steps}
    for _ in tqdm(range(args.repeats), desc="repeats", disable=args.repeats < 2):
        for name, step in steps.items():
            wall, proc = timed_both(lambda step=step: _steps(step, args.steps_per_sample), device)
            times[name].append(wall / args.steps_per_sample)
            cpu[name].append(proc / args.steps_per_sample)
            reset()
    return times, cpu


def bench_layer(args, device, dtype) -> dict[str, dict[str, float | None]]:
    layer, dense, x, g, coefs = build(args, device, dtype)
    layer.train()
    steps = make_steps(layer, dense, x, g, coefs)
    if args.compile:
        steps.update(compiled_steps(layer, dense, x, g, coefs))
    if args.no_loop:
        steps.pop("loop")
    if args.gemm_floors:
        steps.update(make_gemm_floor_steps(layer, x.detach(), g))
    for impl in args.extra_impls:
        steps[f"moe[{impl}]"] = _moe_step_with_impl(layer, x, g, coefs, impl)
    log.info("layer: %s", layer.extra_repr())
    log.info("expert implementation: %s", layer.experts.resolve_impl(args.expert_impl, x))
    times, cpu = interleaved(steps, args, device, lambda: zero_grads(layer, dense, x))
    out: dict[str, dict[str, float | None]] = {}
    for name, step in steps.items():
        peak, saved = measure_memory(step, device)
        zero_grads(layer, dense, x)
        out[name] = {
            "median_s": statistics.median(times[name]),
            "min_s": min(times[name]),
            # median over repeats of (this / dense) in the same repeat: robust to drifting load
            "paired_ratio": statistics.median(
                t / d for t, d in zip(times[name], times["dense"], strict=True)
            ),
            "min_ratio": min(times[name]) / min(times["dense"]),
            "cpu_ratio": statistics.median(cpu[name]) / statistics.median(cpu["dense"]),
            "peak_mib": peak,
            "saved_mib": saved,
        }
    return out


HF_IMPLS = ("eager", "grouped_mm", "batched_mm")


def build_hf(args, device, dtype):
    """transformers' Mixtral block at the benchmark shape and the layer holding its weights."""
    try:
        import transformers
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as exc:
        raise SystemExit(f"--vs-hf needs transformers (pip install 'moe-atlas[hf]'): {exc}") from None
    import impls.hf

    cfg = transformers.MixtralConfig(
        hidden_size=args.d_model,
        intermediate_size=args.d_hidden,
        num_local_experts=args.experts,
        num_experts_per_tok=args.k,
        num_attention_heads=1,
        num_key_value_heads=1,
        hidden_act="silu",
    )
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(args.seed)
    block = MixtralSparseMoeBlock(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, args.d_model**-0.5)
    block.train()
    layer = impls.hf.from_hf(block)
    layer.expert_impl = args.expert_impl
    return block, layer, transformers.__version__


def hf_gathered_gib(args, dtype) -> float:
    """Bytes ``batched_mm`` gathers: one expert's three matrices per (token, slot)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return args.tokens * args.k * 3 * args.d_model * args.d_hidden * elem / 2**30


def bench_vs_hf(args, device, dtype):
    """``(rows, skipped, version)``: the layer and transformers' block, interleaved, same weights."""
    block, layer, version = build_hf(args, device, dtype)
    T, D = args.tokens, args.d_model
    x = torch.randn(1, T, D, dtype=dtype, device=device, requires_grad=True)
    g = torch.randn(1, T, D, dtype=dtype, device=device)
    steps: dict[str, Callable] = {}
    skipped: dict[str, str] = {}
    experts_cfg = block.experts.config

    def hf_step(impl):
        def step(saved: SavedBytes | None = None) -> None:
            experts_cfg._experts_implementation = impl
            with saved.hooks() if saved else contextlib.nullcontext():
                y = block(x.clone())  # the block scales its input in place when jittering
            y.backward(g)

        return step

    for impl in HF_IMPLS:
        gib = hf_gathered_gib(args, dtype)
        if impl == "batched_mm" and gib > args.hf_memory_gib:
            limit = args.hf_memory_gib
            skipped[impl] = f"would gather {gib:.0f} GiB of expert weights (> --hf-memory-gib {limit:g})"
            continue
        steps[f"transformers {impl}"] = hf_step(impl)

    def layer_step(saved: SavedBytes | None = None, fn=layer) -> None:
        with saved.hooks() if saved else contextlib.nullcontext():
            y, _ = fn(x)
        y.backward(g)

    steps["moe-atlas layer"] = layer_step
    if args.compile:
        c_layer = torch.compile(layer, fullgraph=layer.router.compile_break is None)
        steps["moe-atlas layer compiled"] = lambda saved=None: layer_step(saved, c_layer)
    floor = make_gemm_floor_steps(layer, x.detach().view(T, D), g.view(T, D))
    steps["moe-atlas grouped-GEMM floor"] = floor["experts only"]
    with torch.no_grad():  # the layer and the block compute the same function
        ref = block(x.detach().clone())
        out, _ = layer(x.detach())
    err = (out.float() - ref.float()).abs().max().item()
    log.info("max |layer - block| on the benchmark input: %.3g", err)

    def reset():
        zero_grads(block, layer, x)

    times, _ = interleaved(steps, args, device, reset)
    experts_cfg._experts_implementation = "grouped_mm"
    rows = {n: statistics.median(t) for n, t in times.items()}
    return rows, skipped, version, err, times


def report_vs_hf(args, rows, skipped, version, err, times) -> None:
    layer_t = rows["moe-atlas layer"]
    hf_rows = {n: t for n, t in rows.items() if n.startswith("transformers ")}
    best_name = min(hf_rows, key=hf_rows.get)
    print(
        f"\n## Against transformers {version} (MixtralSparseMoeBlock, same weights; max output difference "
        f"{err:.2g}); forward + backward, median of {args.repeats} interleaved repeats\n"
    )
    print("| method | median ms | min ms | layer speed-up (this / layer, paired median) |")
    print("|---|---|---|---|")
    for n, t in rows.items():
        paired = statistics.median(a / b for a, b in zip(times[n], times["moe-atlas layer"], strict=True))
        print(f"| {n} | {t * 1e3:.1f} | {min(times[n]) * 1e3:.1f} | {paired:.3f} |")
    for n, why in skipped.items():
        print(f"| transformers {n} | skipped | | {why} |")
    paired_best = statistics.median(
        a / b for a, b in zip(times[best_name], times["moe-atlas layer"], strict=True)
    )
    floor = rows["moe-atlas grouped-GEMM floor"]
    print(
        f"\nfastest transformers path: {best_name}; its time / the layer's = {paired_best:.3f} "
        f"(>= 1.0: the layer is at least as fast)"
    )
    print(f"layer / its grouped-GEMM floor = {layer_t / floor:.3f} (ratio of medians)")
    if "moe-atlas layer compiled" in rows:
        print(f"compiled layer / eager layer = {rows['moe-atlas layer compiled'] / layer_t:.3f}")


def profile_steps(args, device, dtype) -> None:
    """Print where a moe step and a dense step spend their time, op by op (``--profile``)."""
    from torch.profiler import ProfilerActivity, profile

    layer, dense, x, g, coefs = build(args, device, dtype)
    layer.train()
    steps = make_steps(layer, dense, x, g, coefs)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name in ("moe", "dense"):
        for _ in range(max(args.warmup, 1)):
            steps[name]()
        zero_grads(layer, dense, x)
        sync(device)
        with profile(activities=activities) as prof:
            _steps(steps[name], args.steps_per_sample)
            sync(device)
        zero_grads(layer, dense, x)
        events = prof.key_averages()
        print(f"\n## Profile: {name} step ({args.steps_per_sample} step(s), {len(events)} distinct ops)\n")
        print(events.table(sort_by=sort_by, row_limit=args.profile))


def _steps(step: Callable[[], None], n: int) -> None:
    for _ in range(n):
        step()  # gradients accumulate across the n steps; the cost of that is the same for every method


def _moe_step_with_impl(layer, x, g, coefs, impl: str):
    def step(saved: SavedBytes | None = None) -> None:
        before = layer.expert_impl
        layer.expert_impl = impl
        try:
            with saved.hooks() if saved else contextlib.nullcontext():
                y, plan = layer(x)
                aux = plan.aux_loss(coefs)
            torch.autograd.backward([y, aux], [g, None])
        finally:
            layer.expert_impl = before

    return step


def time_router(router, x: torch.Tensor, args, device) -> tuple[float, float]:
    """Median seconds of a training-mode forward, and of forward + backward."""

    def fwd():
        with torch.no_grad():
            router(x)

    def fwd_bwd():
        plan = router(x)
        loss = (plan.weights_TK * torch.linspace(0.5, 1.5, plan.slots, device=device)).sum()
        loss = loss + sum(v for v in plan.losses.values() if v.requires_grad)
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
        router.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        fwd()
        fwd_bwd()
    tf = statistics.median(timed(fwd, device) for _ in range(args.repeats))
    tb = statistics.median(timed(fwd_bwd, device) for _ in range(args.repeats))
    return tf, tb


def bench_routers(args, device) -> list[tuple[str, str, float | None, float | None, str]]:
    names = args.routers if args.routers is not None else sorted(impls.ROUTERS)
    names = [n for n in names if n]
    T = args.router_tokens or args.tokens
    rows = []
    g = torch.Generator().manual_seed(args.seed)
    x_cpu = torch.randn(T, args.d_model, generator=g)
    for name in tqdm(names, desc="routers", disable=not names):
        kind = "preset" if name in impls.PRESETS else "router"
        try:
            router = impls.build_router(name, d_model=args.d_model, num_experts=args.experts).to(device)
        except Exception as exc:  # e.g. a preset whose k or groups do not fit E
            rows.append((name, kind, None, None, f"{type(exc).__name__}: {exc}"))
            continue
        router.train()
        x = x_cpu.to(device=device, dtype=DTYPES[args.dtype])
        try:
            tf, tb = time_router(router, x, args, device)
            rows.append((name, kind, tf, tb, ""))
        except Exception as exc:
            rows.append((name, kind, None, None, f"{type(exc).__name__}: {exc}"))
    return rows


# ------------------------------------------------------------------------------ report


def fmt(v: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v * scale:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.error("--device %s requested but CUDA is not available", args.device)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    if args.steps_per_sample < 1:
        log.error("--steps-per-sample must be >= 1, got %d", args.steps_per_sample)
        return 2
    if args.k > args.experts:
        log.error("--k %d exceeds --experts %d", args.k, args.experts)
        return 2
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"# MoE layer benchmark — torch {torch.__version__}, {name}, {args.dtype}\n"
        f"# T={args.tokens} D={args.d_model} F={args.d_hidden} E={args.experts} k={args.k} "
        f"activation={args.activation} router={args.router}; training step (forward + backward), "
        f"median of {args.repeats} interleaved repeats of {args.steps_per_sample} consecutive step(s)\n"
    )
    if args.vs_hf:
        if args.activation != "swiglu":
            log.error("--vs-hf compares against Mixtral's SwiGLU experts: pass --activation swiglu")
            return 2
        report_vs_hf(args, *bench_vs_hf(args, device, dtype))
        if args.only_hf:
            return 0
    res = bench_layer(args, device, dtype)
    dense_t = res["dense"]["median_s"]
    moe_t = res["moe"]["median_s"]
    load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"
    print(f"# 1-minute load average at the end of the layer runs: {load} (other work skews CPU timings)\n")
    print(
        "| method | median ms | min ms | vs dense (paired median) | vs dense (min/min) | "
        "vs dense (CPU time) | peak MiB | saved-for-backward MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for m, r in res.items():
        print(
            f"| {m} | {fmt(r['median_s'], 1e3)} | {fmt(r['min_s'], 1e3)} | {r['paired_ratio']:.3f} | "
            f"{r['min_ratio']:.3f} | {r['cpu_ratio']:.3f} | {fmt(r['peak_mib'])} | {fmt(r['saved_mib'])} |"
        )
    print(
        f"\nratio moe/dense = {res['moe']['paired_ratio']:.3f} (paired median; "
        f"ratio of medians {moe_t / dense_t:.3f})"
    )
    if "loop" in res:
        print(f"loop/moe speed-up = {res['loop']['median_s'] / moe_t:.2f}x (ratio of medians)")
    if "moe compiled" in res:
        print(
            f"compiled/eager: moe {res['moe compiled']['median_s'] / moe_t:.3f}, dense "
            f"{res['dense compiled']['median_s'] / dense_t:.3f} (ratio of medians)"
        )
    if "experts only" in res:
        floor = res["experts only"]["median_s"]
        print(f"moe / its expert matmuls alone = {moe_t / floor:.3f}")
        if "loop" in res:
            print(
                f"loop / the layer's expert matmuls alone = {res['loop']['median_s'] / floor:.2f}x: "
                "no dispatch can make the loop/moe speed-up larger at this shape"
            )
    if args.profile > 0:
        profile_steps(args, device, dtype)
    rows = bench_routers(args, device)
    if rows:
        T = args.router_tokens or args.tokens
        print(f"\n## Routers alone (T={T}, D={args.d_model}, E={args.experts}, training mode)\n")
        print("| router | kind | forward ms | forward+backward ms | note |")
        print("|---|---|---|---|---|")
        for name, kind, tf, tb, note in rows:
            print(f"| {name} | {kind} | {fmt(tf, 1e3, 2)} | {fmt(tb, 1e3, 2)} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
