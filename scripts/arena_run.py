#!/usr/bin/env python
"""Run the routing arena: train the byte-level LM with each router and store one JSON per run.

Every registered router and preset (and two dense baselines: equal active FLOPs of a top-2
router, and equal total parameters) trains on the same corpus, data order, model and schedule
(``scripts/arena/harness.py``). A run whose result file exists is skipped unless ``--force``;
routers a causal LM cannot use are recorded as not applicable, with the reason. Results go to
``scripts/arena/results/<name>__seed<k>.json`` with their provenance, and the site's Arena page
and router pages are drawn from them.

Examples:
  python scripts/arena_corpus.py && python scripts/arena_run.py            # everything, seed 0
  python scripts/arena_run.py --only switch_base sinkhorn_ot --seeds 0 1 2
  python scripts/arena_run.py --list
  python scripts/arena_run.py --corpus tests/arena_sample --steps 4 --tiny --results /tmp/r
  python scripts/arena_run.py --only aux_loss_free --results /tmp/r --dump-routing artifacts/routing
"""

from __future__ import annotations

import _checkout

# isort: split

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from catalog.fetched_store import write_atomic
from scripts.arena.corpus import Corpus, CorpusError
from scripts.arena.harness import ArenaConfig, applicability, entries, run
from scripts.arena.model import ModelConfig

log = logging.getLogger("arena")
DEFAULT_CORPUS = _checkout.ROOT / "artifacts" / "arena-corpus"
DEFAULT_RESULTS = _checkout.ROOT / "scripts" / "arena" / "results"
TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32, num_experts=4, d_hidden=32)


def result_path(results: Path, name: str, seed: int) -> Path:
    return results / f"{name}__seed{seed}.json"


def report(results: Path) -> str:
    """A Markdown table of the stored results: means over seeds, best validation loss first."""
    from scripts.sitegen.arena import load_results, summarize

    summaries = summarize(load_results(results))
    ran = sorted((s for s in summaries.values() if s.ok), key=lambda s: s.final("val_bpb")[0])
    lines = [
        "| name | seeds | val bpb | ± | tokens/s | active FFN | max/mean | Gini | MI bits | changed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v, d=3):
        return "—" if v is None else f"{0.0 if abs(v) < 0.5 * 10**-d else v:.{d}f}"

    for s in ran:
        m, sd = s.final("val_bpb")
        cells = [
            s.name,
            str(len(s.seeds)),
            f"{m:.3f}",
            f(sd if len(s.seeds) > 1 else None),
            f"{s.speed('tokens_per_second'):.0f}",
            f"{s.active_width():.0f}",
            f(s.routing("max_over_mean"), 2),
            f(s.routing("gini")),
            f(s.routing("domain_mi_bits")),
            f(s.routing("top_expert_changed")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = sorted((s for s in summaries.values() if not s.ok), key=lambda s: s.name)
    lines += ["", *(f"- {s.name}: {s.note}" for s in skipped)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--only", nargs="+", metavar="NAME", help="routers, presets or baselines to run (default: all)"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (default: 0)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the harness's)")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help=f"corpus directory ({DEFAULT_CORPUS})")
    p.add_argument(
        "--results", type=Path, default=DEFAULT_RESULTS, help=f"results directory ({DEFAULT_RESULTS})"
    )
    p.add_argument("--force", action="store_true", help="rerun runs that already have a result")
    p.add_argument("--tiny", action="store_true", help="a tiny model (for tests and smoke runs)")
    p.add_argument("--list", action="store_true", help="list the entries and whether each applies, then exit")
    p.add_argument(
        "--report", action="store_true", help="print a Markdown table of every stored result, then exit"
    )
    p.add_argument(
        "--dump-routing",
        type=Path,
        default=None,
        metavar="DIR",
        help="also save each trained model's routing of the validation text to DIR/<name>__seed<k>.pt "
        "(for scripts/bench_ep.py --trace)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    names = entries()
    if args.list:
        for name in names:
            ok, note = applicability(name)
            print(f"{name:28s} {'runs' if ok else 'n/a '} {note}")
        return 0
    if args.report:
        print(report(args.results))
        return 0
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            p.error(f"unknown --only names {unknown}; see --list")
        names = args.only
    cfg = ArenaConfig()
    if args.tiny:
        cfg = dataclasses.replace(cfg, model=TINY, batch=4, eval_every=2, eval_windows=2, warmup=1)
    if args.steps is not None:
        if args.steps < 1:
            p.error("--steps must be >= 1")
        cfg = dataclasses.replace(cfg, steps=args.steps, eval_every=min(cfg.eval_every, args.steps))
    try:
        corpus = Corpus.load(args.corpus)
    except CorpusError as exc:
        log.error("%s", exc)
        return 1
    todo = [
        (n, s)
        for n in names
        for s in args.seeds
        if args.force or not result_path(args.results, n, s).exists()
    ]
    skipped = len(names) * len(args.seeds) - len(todo)
    if skipped:
        log.info("%d runs already have results (skipped; --force reruns them)", skipped)
    args.results.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    done = []
    with tqdm(total=len(todo), desc="arena", unit="run") as runs:
        for name, seed in todo:
            runs.set_postfix_str(f"{name} seed {seed}")
            with tqdm(total=cfg.steps, desc=name, unit="step", leave=False) as steps:
                trace = None if args.dump_routing is None else args.dump_routing / f"{name}__seed{seed}.pt"
                doc = run(name, seed, corpus, cfg, progress=steps.update, trace_path=trace)
            write_atomic(
                result_path(args.results, name, seed), json.dumps(doc, indent=1, sort_keys=True) + "\n"
            )
            done.append(doc)
            runs.update(1)
    log.info("%d runs in %.0f s", len(done), time.perf_counter() - started)
    table = Table(title="arena")
    for col in ("name", "seed", "status", "val bpb", "tok/s", "max/mean", "MI bits"):
        table.add_column(col)
    for d in done:
        f = d.get("final", {})
        r = f.get("routing", {})
        table.add_row(
            d["name"],
            str(d["seed"]),
            d["status"],
            f"{f['val_bpb']:.3f}" if f else "",
            f"{d['speed']['tokens_per_second']:.0f}" if "speed" in d else "",
            f"{r['max_over_mean']:.2f}" if r else "",
            f"{r['domain_mi_bits']:.3f}" if r else "",
        )
    Console(stderr=True).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
