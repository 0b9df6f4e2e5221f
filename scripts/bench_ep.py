"""Benchmark expert parallelism on gloo: throughput, bytes moved and per-rank load for every dispatch policy.

Every rank builds the same ``MoELayer`` (same seed), wraps it in ``impls.parallel.ExpertParallel``
once per policy, and times forward + backward steps on its own tokens, the policies interleaved
step by step so that they share the machine's conditions. The router's gate is skewed towards
low-numbered experts (``--skew``: logit bias ``-skew * log(1 + e)``, a Zipf-like popularity) so
that the balancing policies have something to balance. Reported per policy:

* ``tokens_per_s`` — all ranks' tokens per second (the slowest rank's median step);
* ``bytes_per_step`` — bytes that cross ranks in one training step: the routing all-gather (global
  routing), the rows of the dispatch and combine all-to-alls and the expert weights a policy sends,
  each forward and backward (counted from the step's ``Assignment``, not sniffed from the wire);
* ``max_load`` / ``mean_load`` / ``imbalance`` — rows computed per rank (mean over the timed steps);
  ``makespan`` — the slowest rank's compute time over the mean rows per rank, with ReaLB's
  low-precision ranks counted at ``1 / fp4_speedup`` of their rows (equal to ``imbalance`` for
  the other policies).

Two ways to run it:

    python scripts/bench_ep.py --world-sizes 2,4            # spawns the processes itself
    torchrun --nproc-per-node 4 scripts/bench_ep.py         # one world size, launched by torchrun

A third, ``--trace``, starts no process: it feeds routing traces of trained arena models (real
text; ``scripts/arena_run.py --dump-routing DIR``) to the single-process simulator
(``impls.parallel.simulate``), every MoE layer cut into ``W`` equal rank shards, and reports each
policy's per-rank load and bytes (default output ``scripts/results/ep_traces.json``):

    python scripts/bench_ep.py --trace artifacts/routing/*.pt --world-sizes 2,4

Results (rank 0) go to ``--out`` (default ``scripts/results/bench_ep.json``) with their provenance
(commit, versions, machine, date). On one machine the ranks share its cores (``--threads`` each):
the throughput figures measure the implementation's overheads, not a cluster's network.
"""

from __future__ import annotations

import _checkout  # first: this checkout's packages and data

# isort: split

import argparse
import datetime
import json
import logging
import os
import pickle
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "scripts" / "results" / "bench_ep.json"
DEFAULT_TRACE_OUT = ROOT / "scripts" / "results" / "ep_traces.json"
POLICY_NAMES = ("standard", "llep", "finemoe", "relibra", "realb")
log = logging.getLogger("bench_ep")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-sizes", default="2,4", help="process counts to spawn (ignored under torchrun)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step (default 2048)")
    p.add_argument("--d-model", type=int, default=256, help="model width D (default 256)")
    p.add_argument("--d-hidden", type=int, default=512, help="expert hidden width F (default 512)")
    p.add_argument("--experts", type=int, default=16, help="routed experts E (default 16)")
    p.add_argument("--k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--router", default="topk", help="router name (default topk)")
    p.add_argument("--skew", type=float, default=1.0, help="gate bias -skew*log(1+e) (default 1.0; 0 = none)")
    p.add_argument("--policies", default=",".join(POLICY_NAMES), help="comma-separated dispatch policies")
    p.add_argument("--routing", default="global", choices=["global", "local"])
    p.add_argument("--steps", type=int, default=8, help="timed steps per policy (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per policy")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a spawned run is killed")
    p.add_argument(
        "--trace",
        nargs="+",
        type=Path,
        default=None,
        metavar="FILE",
        help="simulate these arena routing traces instead of timing processes",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON results (default {DEFAULT_OUT}; with --trace {DEFAULT_TRACE_OUT})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = DEFAULT_TRACE_OUT if args.trace else DEFAULT_OUT
    args.policies = [s for s in args.policies.split(",") if s]
    bad = sorted(set(args.policies) - set(POLICY_NAMES))
    if bad:
        p.error(f"--policies: unknown {bad}; known: {', '.join(POLICY_NAMES)}")
    try:
        args.world_sizes = [int(s) for s in args.world_sizes.split(",") if s]
    except ValueError:
        p.error(f"--world-sizes must be comma-separated integers, got {args.world_sizes!r}")
    for name in ("tokens", "d_model", "d_hidden", "experts", "k", "steps", "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    return args


def provenance() -> dict[str, str]:
    return {
        "commit": _checkout.commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, "
        f"{os.cpu_count()} cores",
        "script": "scripts/bench_ep.py",
    }


def _policy(name: str, world: int):
    from impls.parallel import build_policy

    if name == "llep":
        return build_policy("llep", min_chunk=64)
    if name == "relibra":
        return build_policy("relibra", ranks_per_node=max(1, world // 2))
    if name == "realb":
        return build_policy("realb")
    return build_policy(name)


def step_bytes(a, args, world: int, bytes_per_value: int, expert_numel: int) -> int:
    """Bytes crossing ranks in one forward + backward step, all ranks together (module docstring)."""
    rows = a.rows_RER.sum(1)
    moved = int(rows.sum() - rows.trace())
    token = 2 * moved * args.d_model * bytes_per_value  # dispatch + combine
    weights = len(a.transfers) * expert_numel * bytes_per_value
    gather = 0
    if args.routing == "global":
        gather = (world - 1) * args.tokens * args.d_model * bytes_per_value * world
    return 2 * (token + weights + gather)


def run_rank(rank: int, world: int, args: argparse.Namespace) -> dict | None:
    from impls import MoELayer
    from impls.parallel import ExpertParallel

    torch.manual_seed(args.seed)
    layer = MoELayer(args.d_model, args.d_hidden, args.experts, args.router, k=args.k)
    if args.skew:
        with torch.no_grad():
            if layer.router.gate.bias is None:
                layer.router.gate.bias = torch.nn.Parameter(torch.zeros(args.experts))
            layer.router.gate.bias.copy_(
                -args.skew * torch.log1p(torch.arange(args.experts, dtype=torch.float32))
            )
    eps = {}
    for name in args.policies:
        import copy

        eps[name] = ExpertParallel(copy.deepcopy(layer), routing=args.routing, policy=_policy(name, world))
    g = torch.Generator().manual_seed(args.seed + 1 + rank)
    x = torch.randn(args.tokens, args.d_model, generator=g)
    grad = torch.randn(args.tokens, args.d_model, generator=g)
    if "relibra" in eps:  # routing replay: the batch's routing is known before the step
        ep = eps["relibra"]
        with torch.no_grad():
            plan = ep.router(x)
        counts = torch.bincount(plan.expert_ids_TK.reshape(-1), minlength=args.experts)
        dist.all_reduce(counts)
        ep.policy.plan_placement(counts, world)
    times: dict[str, list[float]] = {n: [] for n in eps}
    loads: dict[str, list] = {n: [] for n in eps}
    bytes_: dict[str, list[int]] = {n: [] for n in eps}
    for i in range(args.warmup + args.steps):
        for name, ep in eps.items():
            dist.barrier()
            t0 = time.perf_counter()
            out, _ = ep(x)
            out.backward(grad)
            ep.zero_grad(set_to_none=True)
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if i >= args.warmup:
                a = ep.last_assignment
                times[name].append(float(dt))
                t_rows = a.load_R.astype(float)
                if name == "realb":
                    t_rows = ep.policy.compute_time_R(a)
                loads[name].append((a.load_R.tolist(), t_rows.tolist()))
                numel = sum(p[0].numel() for p in ep.experts.parameters())
                bytes_[name].append(step_bytes(a, args, world, 4, numel))
        if rank == 0:
            log.debug("step %d done", i)
    if rank != 0:
        return None
    results = []
    for name in eps:
        med = statistics.median(times[name])
        load = torch.tensor([l for l, _ in loads[name]], dtype=torch.float64).mean(0)
        ctime = torch.tensor([t for _, t in loads[name]], dtype=torch.float64).mean(0)
        results.append(
            {
                "policy": name,
                "step_ms": 1000 * med,
                "tokens_per_s": world * args.tokens / med,
                "bytes_per_step": int(statistics.median(bytes_[name])),
                "load": load.tolist(),
                "max_load": float(load.max()),
                "mean_load": float(load.mean()),
                "imbalance": float(load.max() / load.mean()),
                "makespan": float(ctime.max() / load.mean()),
            }
        )
    return {
        "world_size": world,
        "launcher": "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "spawn",
        "results": results,
    }


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=args.timeout),
    )
    try:
        res = run_rank(rank, world, args)
        if res is not None:
            Path(out_dir, "result.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(args) -> dict:
    return {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("out", "verbose", "timeout", "world_sizes")
    }


def write(args, runs: list[dict]) -> None:
    doc = {"provenance": provenance(), "config": config(args), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(f.name, args.out)
    log.info("wrote %s", args.out)


def report(run: dict) -> None:
    base = next((r for r in run["results"] if r["policy"] == "standard"), None)
    log.info("world size %d:", run["world_size"])
    log.info(
        "  %-9s %10s %12s %14s %9s %9s %10s",
        "policy",
        "step ms",
        "tokens/s",
        "MB/step",
        "max/mean",
        "makespan",
        "vs std",
    )
    for r in run["results"]:
        rel = f"{base['step_ms'] / r['step_ms']:.3f}x" if base else "-"
        log.info(
            "  %-9s %10.1f %12.0f %14.2f %9.3f %9.3f %10s",
            r["policy"],
            r["step_ms"],
            r["tokens_per_s"],
            r["bytes_per_step"] / 2**20,
            r["imbalance"],
            r["makespan"],
            rel,
        )


def simulate_traces(args) -> int:
    """``--trace``: every layer of every trace, every world size and policy, in the simulator."""
    from impls.parallel import counts_from_expert_ids, simulate

    rows, sources = [], []
    for path in args.trace:
        try:
            trace = torch.load(path, map_location="cpu", weights_only=False)
            layers, E = trace["layers"], int(trace["num_experts"])
        except (
            OSError,
            EOFError,
            KeyError,
            RuntimeError,
            TypeError,
            ValueError,
            pickle.UnpicklingError,
        ) as exc:
            log.error("%s: not a routing trace of scripts/arena_run.py --dump-routing (%s)", path, exc)
            return 1
        gated = trace.get("activation") in ("swiglu", "geglu", "gpt_oss_swiglu")
        numel = trace.get("d_model", 0) * trace.get("d_hidden", 0) * (3 if gated else 2)
        sources.append(
            {
                "file": path.name,
                "name": trace.get("name"),
                "seed": trace.get("seed"),
                "arena": trace.get("provenance"),
            }
        )
        for world in args.world_sizes:
            for li, layer in enumerate(layers):
                ids, keep = layer["expert_ids"], layer["keep"]
                if E % world or ids.shape[0] % world:
                    log.warning(
                        "%s layer %d: skipped for world size %d (E=%d, T=%d)",
                        path.name,
                        li,
                        world,
                        E,
                        ids.shape[0],
                    )
                    continue
                counts = counts_from_expert_ids(ids, E, world, keep)
                for name in args.policies:
                    pol = _policy(name, world)
                    if name == "relibra":  # routing replay: the batch's loads are known ahead
                        pol.plan_placement(counts.sum(0), world)
                    s = simulate(counts, pol, d_model=trace.get("d_model", 0), expert_numel=numel)
                    rows.append(
                        {
                            "trace": trace.get("name", path.stem),
                            "layer": li,
                            "world_size": world,
                            "policy": name,
                            "imbalance": s.imbalance,
                            "makespan": s.makespan,
                            "max_load": s.max_load,
                            "mean_load": s.mean_load,
                            "step_bytes": s.step_bytes,
                            "transfers": s.transfers,
                        }
                    )
    doc = {"provenance": provenance(), "policies": args.policies, "traces": sources, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(f.name, args.out)
    for world in args.world_sizes:
        for name in args.policies:
            sel = [r for r in rows if r["world_size"] == world and r["policy"] == name]
            if sel:
                mean = statistics.mean(r["imbalance"] for r in sel)
                log.info("W=%d %-9s mean max/mean over %d layers: %.3f", world, name, len(sel), mean)
    log.info("wrote %s", args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.trace:
        return simulate_traces(args)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # torchrun
        torch.set_num_threads(args.threads)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
        try:
            res = run_rank(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
        if res is not None:
            report(res)
            write(args, [res])
        return 0
    import torch.multiprocessing as mp
    from tqdm import tqdm

    runs = []
    for world in tqdm(args.world_sizes, desc="world sizes", disable=None):
        if args.experts % world:
            log.error("--experts %d is not divisible by world size %d", args.experts, world)
            return 2
        with tempfile.TemporaryDirectory() as d:
            ctx = mp.start_processes(
                _spawned, args=(world, _free_port(), args, d), nprocs=world, join=False, start_method="spawn"
            )
            deadline = time.monotonic() + args.timeout
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    log.error("world size %d ran past --timeout %s s", world, args.timeout)
                    return 1
            run = json.loads(Path(d, "result.json").read_text())
        report(run)
        runs.append(run)
    write(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
