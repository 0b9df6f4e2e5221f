"""Time the optimal-transport and assignment routers against plain softmax top-k, router only.

For ``T`` tokens of width ``D`` and ``E`` experts it times one training-mode forward of each router
(gate matmul plus routing decision, gradients enabled as in training) and divides by the time of
the baseline: the registered ``topk`` router (softmax over experts, top-k, renormalized as in
Mixtral for k > 1, the raw probability for k = 1) when present, else an inline ``softmax`` +
``torch.topk`` (the output says which).
Routers are timed interleaved, repeat by repeat, and medians are reported together with what each
router reports about its own work: Sinkhorn iterations and final marginal error, auction rounds and
cycle repairs and searches of the exact assignment, and the resulting max/mean expert load.

The ``ops`` column counts the tensor operations (ATen ops that compute, views excluded) of one
call that produce a tensor on the benchmark device, in a separate untimed call. On a GPU each is a
kernel launch, and router-sized problems are bound by launches, so it explains the GPU ratios from
any machine; on the CPU it also counts the exact assignment's host-side cycle search.

SSR is timed on a Sinkhorn step (``sinkhorn_prob=1``); on average it costs
``p * t(Sinkhorn step) + (1 - p) * t(top-k)`` with ``p`` its Sinkhorn fraction.

Examples::

    python scripts/bench_routers_ot.py                          # CPU, T=16384, E=64
    python scripts/bench_routers_ot.py --device cuda --repeats 20
    python scripts/bench_routers_ot.py --tokens 4096 --experts 16 --routers s_base base_layers
"""

from __future__ import annotations

import _checkout  # noqa: F401  (first: this checkout's packages and data)

# isort: split

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

import impls

log = logging.getLogger("bench_routers_ot")

#: name shown -> (registry name, options); ``k`` is added where the router takes one
ROUTERS: dict[str, tuple[str, dict]] = {
    "sinkhorn_ot": ("efficient_routing_ot", {}),
    "s_base": ("s_base", {}),
    "ssr (Sinkhorn step)": ("ssr", {"sinkhorn_prob": 1.0}),
    "bip_balancing": ("bip_balancing", {}),
    "base_layers": ("base_layers", {}),
    "expert_choice_cf2": ("expert_choice_cf2", {}),
}
NO_K = {"base_layers", "expert_choice_cf2"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens T (default 16384)")
    p.add_argument("--experts", type=int, default=64, help="experts E (default 64)")
    p.add_argument("--d-model", type=int, default=1024, help="model width D (default 1024)")
    p.add_argument("--k", type=int, default=1, help="experts per token for the top-k routers (default 1)")
    p.add_argument(
        "--routers", nargs="*", default=sorted(ROUTERS), help=f"which of {sorted(ROUTERS)} (default: all)"
    )
    p.add_argument("--skew", type=float, default=0.0, help="extra logit bias on expert 0 (default 0)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    unknown = set(args.routers) - set(ROUTERS)
    if unknown:
        p.error(f"--routers: unknown {sorted(unknown)}; choose from {sorted(ROUTERS)}")
    for name in ("tokens", "experts", "d_model", "k", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.k > args.experts:
        p.error("--k must not exceed --experts")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(name: str, options: dict, args, device: torch.device) -> impls.Router:
    torch.manual_seed(args.seed)
    opts = dict(options)
    if name not in NO_K:
        opts["k"] = args.k
    if args.skew:
        opts["router_bias"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # expert choice's causality warning
        router = impls.build_router(name, d_model=args.d_model, num_experts=args.experts, **opts)
    if args.skew:
        with torch.no_grad():
            router.gate.bias.zero_()
            router.gate.bias[0] = args.skew
    return router.to(device).train()


def baseline(args, device: torch.device) -> tuple[str, Callable[[torch.Tensor], object]]:
    if "topk" in impls.ROUTERS:
        # renormalizing a single weight would make it the constant 1, so top-1 keeps the raw probability
        router = build("topk", {"normalize": args.k > 1}, args, device)
        how = "renormalized" if args.k > 1 else "raw probability"
        return f"registered 'topk' router (softmax, top-{args.k}, {how})", router
    torch.manual_seed(args.seed)
    gate = torch.nn.Linear(args.d_model, args.experts, bias=False, device=device)

    def inline(x: torch.Tensor):
        probs = gate(x.float()).softmax(-1)
        return probs.topk(args.k, dim=-1)

    return "inline softmax + torch.topk", inline


class OpCounter(TorchDispatchMode):
    """Counts the computing ATen ops (not views) whose output lies on ``device``."""

    SKIP = frozenset({"lift_fresh", "scalar_tensor", "_local_scalar_dense", "empty", "detach"})

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device, self.ops = device, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket.__name__ not in self.SKIP:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if any(isinstance(o, torch.Tensor) and o.device.type == self.device.type for o in outs):
                self.ops += 1
        return out


def count_ops(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> int:
    with OpCounter(x.device) as counter:
        fn(x)
    return counter.ops


def describe(plan: impls.RoutingPlan) -> dict[str, str]:
    info = plan.info
    out = {"iters": "", "error": "", "rounds": "", "repairs": ""}
    if "sinkhorn_iterations" in info:
        out["iters"] = str(int(info["sinkhorn_iterations"]))
        out["error"] = f"{float(info['sinkhorn_marginal_error']):.1e}"
    if "assignment_rounds" in info:
        out["rounds"] = str(info["assignment_rounds"])
        out["repairs"] = f"{info['assignment_repairs']}{'' if info['assignment_optimal'] else ' (!)'}"
        out["searches"] = str(info["assignment_searches"])
    load = plan.expert_load
    out["max/mean load"] = f"{float(load.max() / load.mean()):.3f}"
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log.error("--device %s: CUDA is not available", args.device)
        return 2
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.tokens, args.d_model, generator=g).to(device)

    base_name, base_fn = baseline(args, device)
    runs: dict[str, Callable[[torch.Tensor], object]] = {"top-k baseline": base_fn}
    for shown in args.routers:
        name, options = ROUTERS[shown]
        runs[shown] = build(name, options, args, device)
    log.info(
        "T=%d E=%d D=%d k=%d on %s (%d threads), %d repeats",
        args.tokens,
        args.experts,
        args.d_model,
        args.k,
        device,
        torch.get_num_threads(),
        args.repeats,
    )
    times: dict[str, list[float]] = {n: [] for n in runs}
    plans: dict[str, object] = {}
    for i in tqdm(range(args.warmup + args.repeats), desc="repeats", disable=None):
        for n, fn in runs.items():
            sync(device)
            t0 = time.perf_counter()
            out = fn(x)
            sync(device)
            if i >= args.warmup:
                times[n].append(time.perf_counter() - t0)
            plans[n] = out
    base_ms = statistics.median(times["top-k baseline"]) * 1e3

    print(f"\nBaseline: {base_name}: {base_ms:.3f} ms")
    cols = ["router", "ms", "x top-k", "ops", "iters", "error"]
    cols += ["rounds", "repairs", "searches", "max/mean load"]
    rows = []
    for n, fn in runs.items():
        ms = statistics.median(times[n]) * 1e3
        row = {"router": n, "ms": f"{ms:.3f}", "x top-k": f"{ms / base_ms:.2f}", "ops": str(count_ops(fn, x))}
        plan = plans[n]
        row.update(describe(plan) if isinstance(plan, impls.RoutingPlan) else {})
        rows.append(row)
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(r.get(c, "").ljust(widths[c]) for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
