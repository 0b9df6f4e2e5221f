"""The expert-parallelism page: ``impls.parallel``, its dispatch policies, the simulator and the benchmark."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from scripts.sitegen.context import ROUTERS_INDEX, ROUTERS_PARALLEL, SiteContext
from scripts.sitegen.pages_routers import demote_headings
from scripts.sitegen.pages_works import work_link
from scripts.sitegen.text import code, fence, md, rel

RESULTS = Path(__file__).resolve().parents[1] / "results" / "bench_ep.json"
TRACES = Path(__file__).resolve().parents[1] / "results" / "ep_traces.json"

EXAMPLE = """\
# torchrun --nproc-per-node 4 train.py
import torch
import torch.distributed as dist

from impls import MoELayer
from impls.parallel import ExpertParallel

dist.init_process_group("gloo")  # "nccl" on GPUs
torch.manual_seed(0)  # the same full layer on every rank
layer = MoELayer(512, 1024, 16, "deepseek_v3", n_group=4, topk_group=2)
moe = ExpertParallel(layer, policy="llep")  # this rank keeps 16 / 4 experts

x = torch.randn(8, 256, 512)  # this rank's tokens
out, plan = moe(x)  # the mixture for them (add the residual yourself)
loss = out.square().mean() + plan.aux_loss(moe.loss_coefficients)
loss.backward()
moe.all_reduce_grads()  # or wrap the model: impls.parallel.data_parallel(model)
moe.step()  # between-step router state (here the aux-free bias)
"""

CHECKPOINT = """\
import torch.distributed.checkpoint as dcp

dcp.save(moe.sharded_state_dict(), checkpoint_id="ckpt/")      # experts as DTensor shards
# later, on any number of ranks:
sd = moe.sharded_state_dict()
dcp.load(sd, checkpoint_id="ckpt/")
moe.load_sharded_state_dict(sd)
# or into one full MoELayer, without torch.distributed:
sd = layer.state_dict()
dcp.load(sd, checkpoint_id="ckpt/", no_dist=True)
layer.load_state_dict(sd)
"""

SIMULATE = """\
import torch
from impls import build_router
from impls.parallel import counts_from_plan, simulate

plan = build_router("topk", d_model=64, num_experts=16, k=2)(torch.randn(4096, 64))
counts = counts_from_plan(plan, world_size=4)  # rows per (rank, expert)
for policy in ("standard", "llep", "finemoe"):
    s = simulate(counts, policy, d_model=64, expert_numel=2 * 64 * 128)
    print(policy, s.load_R, round(s.imbalance, 3), s.step_bytes)
"""


def load_bench(path: Path = RESULTS) -> dict[str, Any] | None:
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _bench_table(doc: dict[str, Any]) -> list[str]:
    prov, cfg = doc["provenance"], doc["config"]
    out = [
        f"Measured by `scripts/bench_ep.py` (commit `{prov['commit'][:12]}`, {md(prov['date'])}, "
        f"torch {md(prov['torch'])}, {md(prov['machine'])}): gloo on one machine, "
        f"{cfg['tokens']} tokens per rank, D={cfg['d_model']}, F={cfg['d_hidden']}, "
        f"E={cfg['experts']}, k={cfg['k']}, router `{cfg['router']}` with its gate skewed "
        f"(bias -{cfg['skew']} log(1+e)), {cfg['routing']} routing, forward + backward, median of "
        f"{cfg['steps']} steps, {cfg['threads']} thread(s) per process. The ranks share the machine's "
        "cores, so the throughput compares the policies' overheads; it is not a cluster's figure.",
        "",
        "| ranks | policy | step ms | tokens/s | MB moved per step | max/mean rows | makespan "
        "| speed vs standard |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in doc["runs"]:
        base = next((r for r in run["results"] if r["policy"] == "standard"), None)
        for r in run["results"]:
            rel_speed = f"{base['step_ms'] / r['step_ms']:.2f}x" if base else "—"
            out.append(
                f"| {run['world_size']} | `{r['policy']}` | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
                f"{r['bytes_per_step'] / 2**20:.2f} | {r['imbalance']:.3f} | "
                f"{r['makespan']:.3f} | {rel_speed} |"
            )
    out += [
        "",
        "*max/mean rows*: the most-loaded rank's rows over the mean (1.0 is perfect balance); "
        "*makespan*: the slowest rank's compute time over the mean rows per rank, ReaLB's low-precision "
        "ranks counted at 1/`fp4_speedup` of their rows (on this CPU the emulated NVFP4 costs time "
        "instead of saving it, so its measured step time is slower). Bytes count the routing "
        "all-gather, the dispatch and combine all-to-alls and the weights a policy sends, forward "
        "and backward, all ranks together.",
        "",
    ]
    return out


def _traces_table(doc: dict[str, Any]) -> list[str]:
    prov = doc["provenance"]
    names = ", ".join(f"`{t['name']}` (seed {t['seed']})" for t in doc["traces"])
    out = [
        "### On real text: arena routing traces",
        "",
        f"`scripts/bench_ep.py --trace` (commit `{prov['commit'][:12]}`, {md(prov['date'])}) fed the "
        f"validation-text routing of trained arena models ({names}; `scripts/arena_run.py "
        "--dump-routing`) to the simulator, every MoE layer's tokens cut into equal contiguous rank "
        "shards. Mean and worst max/mean rows over the layers, the mean makespan (ReaLB's time model), "
        "and the mean bytes of one training step (dispatch, combine and weight transfers, forward and "
        "backward; the routing all-gather is not part of the simulator):",
        "",
        "| trace | ranks | policy | mean max/mean | worst max/mean | makespan | KB per step "
        "| weight transfers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in doc["rows"]:
        groups.setdefault((r["trace"], r["world_size"], r["policy"]), []).append(r)
    for (trace, world, policy), rows in groups.items():
        mean = sum(r["imbalance"] for r in rows) / len(rows)
        worst = max(r["imbalance"] for r in rows)
        kb = sum(r["step_bytes"] for r in rows) / len(rows) / 1024
        span = sum(r["makespan"] for r in rows) / len(rows)
        transfers = sum(r["transfers"] for r in rows) / len(rows)
        out.append(
            f"| `{trace}` | {world} | `{policy}` | {mean:.3f} | {worst:.3f} | {span:.3f} | {kb:.1f} | "
            f"{transfers:.1f} |"
        )
    return [*out, ""]


def parallel_page(ctx: SiteContext) -> str:
    import impls.parallel.expert_parallel as ep_mod
    import impls.parallel.policies as pol_mod
    import impls.parallel.simulate as sim_mod
    from impls.parallel import POLICIES

    doc = ROUTERS_PARALLEL
    out = [
        "# Expert parallelism",
        "",
        "`impls.parallel.ExpertParallel` shards an `impls.MoELayer`'s routed experts over the ranks "
        "of a `torch.distributed` process group and exchanges tokens with `all_to_all_single`. "
        "Every rank's output, routing, losses and gradients equal one process running the layer on "
        "all ranks' tokens concatenated (float32, 1e-5; tested on gloo with 2 and 4 processes for "
        "top-k, Switch with capacity, DeepSeek-V3 with its bias, Sinkhorn, expert choice, quantile "
        "balancing and BIP, with uneven splits, a rank without tokens, a rank whose tokens are all "
        "padding and a rank that receives no rows). It works under `DistributedDataParallel`, saves "
        "and loads sharded experts with `torch.distributed.checkpoint` on any world size, runs under "
        "`torchrun`, and takes the catalog's system-level balancing methods as dispatch policies.",
        "",
        fence(EXAMPLE, "python"),
        "",
        "Checkpoints reshard through `torch.distributed.checkpoint`:",
        "",
        fence(CHECKPOINT, "python"),
        "",
        "## How it works",
        "",
        demote_headings(inspect.getdoc(ep_mod) or ""),
        "",
        "## Dispatch policies",
        "",
        demote_headings(inspect.getdoc(pol_mod) or ""),
        "",
        "| policy | class | work | moves rows |",
        "|---|---|---|---|",
    ]
    for name, cls in POLICIES.items():
        works = ", ".join(work_link(ctx, doc, s) for s in cls.papers) or "—"
        moves = "yes" if cls.moves_rows else "no"
        out.append(f"| [`{name}`](#policy-{name}) | {code(cls.__name__)} | {works} | {moves} |")
    out.append("")
    for name, cls in POLICIES.items():
        out += [f"### `{cls.__name__}` {{#policy-{name}}}", ""]
        if cls.papers:
            links = ", ".join(work_link(ctx, doc, s) for s in cls.papers)
            out += [f"Implements {links}. `impls.parallel.{cls.__name__}`, name `{name}`.", ""]
        out += [demote_headings(inspect.getdoc(cls) or ""), ""]
    out += [
        "## Simulator",
        "",
        demote_headings(inspect.getdoc(sim_mod) or ""),
        "",
        fence(SIMULATE, "python"),
        "",
        "## Measured",
        "",
    ]
    bench = load_bench()
    if bench is None:
        out += ["`scripts/bench_ep.py` has not been run on this checkout: no figures to show.", ""]
    else:
        out += _bench_table(bench)
    traces = load_bench(TRACES)
    if traces is not None:
        out += _traces_table(traces)
    out += [f"Back to the [router index]({rel(doc, ROUTERS_INDEX)}).", ""]
    return "\n".join(out)
