#!/usr/bin/env python
"""Measure how evenly the Sinkhorn routers' *selected* experts are loaded, against ε.

The transport plan's marginals are balanced (every expert receives ``T/E`` units of mass), but a
token then takes the top-``k`` entries of its row, and those selections need not be balanced.
They are not when one expert is better for most tokens by a margin that differs from token to
token: a constant shift of one column is cancelled exactly by Sinkhorn's column scaling, a
token-dependent margin is not, and at a large ε the plan rows stay close to the softmax of the
scores, so most tokens still pick the favoured expert.

Skew model, per token ``t`` and expert ``e`` (router-scale logits, standard deviation 1):
``h_te = z_te + m_t [e = 0]`` with ``z ~ N(0, 1)``, and for a fraction ``favoured`` of the tokens
a margin ``m_t ~ Uniform(0, 2 * margin)`` (mean ``margin``); the other tokens get none.

``sinkhorn_ot``, ``sinkhorn_balanced`` (S-BASE) and ``selective_sinkhorn`` (on its Sinkhorn steps)
all select the top-``k`` entries of the same plan, so the selection is measured once, through
``sinkhorn_ot``. For each ε, skew, ``(E, k)`` and seed the script records the selected load
max/mean (kept assignments per expert over their mean), their coefficient of variation, the
plan's marginal error and the iterations used (tolerance 1e-4, cap 1000).
Results go to ``scripts/results/sinkhorn_balance.json`` with their provenance; the router pages
show them. Run with ``--help`` for options.
"""

from __future__ import annotations

import _checkout  # first: this checkout's packages and data

# isort: split

import argparse
import datetime as dt
import itertools
import json
import logging
import platform
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import impls
from catalog.fetched_store import write_atomic

log = logging.getLogger("measure_sinkhorn_balance")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "scripts" / "results" / "sinkhorn_balance.json"
EPSILONS = (0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
SKEWS = ({"favoured": 0.8, "margin": 1.0}, {"favoured": 0.8, "margin": 2.0}, {"favoured": 0.5, "margin": 1.0})
SHAPES = ((8, 1), (8, 2), (64, 2))


def skewed_logits(tokens: int, experts: int, favoured: float, margin: float, seed: int) -> torch.Tensor:
    """``h_TE``: standard-normal logits plus a token-dependent margin for expert 0 on most tokens."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, experts, generator=g)
    chosen = torch.rand(tokens, generator=g) < favoured
    h[:, 0] += chosen.float() * torch.rand(tokens, generator=g) * 2 * margin
    return h


def measure(eps: float, experts: int, k: int, h_TE: torch.Tensor) -> dict[str, float]:
    options: dict[str, object] = {"k": k, "epsilon": eps, "sinkhorn_iters": 1000}
    r = impls.build_router("sinkhorn_ot", d_model=experts, num_experts=experts, **options)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(experts))  # logits = the input
        plan = r.train()(h_TE)
    load = plan.expert_load
    return {
        "selected_max_over_mean": float(load.max() / load.mean()),
        "selected_cv": float(load.std(unbiased=False) / load.mean()),
        "marginal_error": float(plan.info["sinkhorn_marginal_error"]),
        "iterations": int(plan.info["sinkhorn_iterations"]),
        "top1_share_of_expert0": float((h_TE.argmax(-1) == 0).float().mean()),
    }


def worst_by_epsilon(rows: list[dict]) -> dict[float, float]:
    """The largest selected max/mean over every skew, shape and seed, per ε."""
    worst: dict[float, float] = {}
    for r in rows:
        worst[r["epsilon"]] = max(worst.get(r["epsilon"], 0.0), r["selected_max_over_mean"])
    return worst


def provenance() -> dict[str, str]:
    cpu = platform.processor() or platform.system()
    return {
        "commit": _checkout.commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {cpu}, {torch.get_num_threads()} threads",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "script": "scripts/measure_sinkhorn_balance.py",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch (4096)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting (3)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output JSON (default: {DEFAULT_OUT})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.tokens < 1 or args.seeds < 1:
        p.error("--tokens and --seeds must be positive")
    grid = list(itertools.product(EPSILONS, SKEWS, SHAPES, range(args.seeds)))
    rows = []
    for eps, skew, (experts, k), seed in tqdm(grid, desc="sinkhorn balance", unit="run"):
        h = skewed_logits(args.tokens, experts, skew["favoured"], skew["margin"], seed)
        rows.append(
            {"epsilon": eps, **skew, "experts": experts, "k": k, "seed": seed, **measure(eps, experts, k, h)}
        )
    doc = {"provenance": provenance(), "tokens": args.tokens, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    for eps, value in sorted(worst_by_epsilon(rows).items()):
        log.info("eps=%-5g worst selected max/mean %.3f", eps, value)
    log.info("wrote %s (%d rows)", args.out, len(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
