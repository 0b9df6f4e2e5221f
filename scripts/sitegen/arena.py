"""The arena's results as the site reads them: one JSON per run under ``scripts/arena/results/``.

``load_results()`` reads and checks the files (a malformed one is skipped with a warning naming
it); ``Summary`` averages the runs of one entry over its seeds; ``claims()`` evaluates the seed
papers' claims on the runs.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parents[1] / "arena" / "results"
REQUIRED = ("name", "seed", "status", "provenance")


def load_results(directory: Path = RESULTS) -> list[dict[str, Any]]:
    """Every run document in ``directory`` (``[]`` when there is none), in file-name order."""
    out = []
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("%s: unreadable arena result, skipped: %s", path, exc)
            continue
        missing = [k for k in REQUIRED if not isinstance(doc, dict) or k not in doc]
        if missing:
            log.warning("%s: arena result without %s, skipped", path, ", ".join(missing))
            continue
        if doc["status"] == "ok" and not all(k in doc for k in ("curve", "final", "speed")):
            log.warning("%s: arena result marked ok without curve/final/speed, skipped", path)
            continue
        out.append(doc)
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass
class Summary:
    """One entry's runs (all seeds) and their averages."""

    name: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["status"] == "ok"]

    @property
    def status(self) -> str:
        return "ok" if self.ok else self.runs[0]["status"]

    @property
    def note(self) -> str:
        return self.runs[0].get("note", "")

    @property
    def kind(self) -> str:
        return self.runs[0].get("kind", "")

    @property
    def seeds(self) -> list[int]:
        return sorted(r["seed"] for r in self.ok)

    def final(self, key: str) -> tuple[float, float]:
        return _mean_std([r["final"][key] for r in self.ok])

    def bpb_domain(self, domain: str) -> float:
        return _mean_std([r["final"]["val_bpb_by_domain"][domain] for r in self.ok])[0]

    def routing(self, key: str) -> float | None:
        vals = [r["final"].get("routing", {}).get(key) for r in self.ok]
        vals = [v for v in vals if v is not None]
        return statistics.fmean(vals) if vals else None

    def speed(self, key: str) -> float:
        return _mean_std([r["speed"][key] for r in self.ok])[0]

    def active_width(self) -> float:
        return _mean_std([r.get("active_ffn_width", math.nan) for r in self.ok])[0]

    def curve(self, seed: int | None = None) -> list[tuple[float, float]]:
        runs = self.ok if seed is None else [r for r in self.ok if r["seed"] == seed]
        if not runs:
            return []
        run = runs[0]
        return [(p["tokens"], p["val_bpb"]) for p in run["curve"]]


def summarize(results: list[dict[str, Any]]) -> dict[str, Summary]:
    out: dict[str, Summary] = {}
    for r in results:
        out.setdefault(r["name"], Summary(r["name"])).runs.append(r)
    return out


def tokens_to_reach(curve: list[dict[str, Any]], target: float) -> float | None:
    """Training tokens at which validation bits per byte first reach ``target``.

    Linear between checkpoints; ``None`` when the curve never gets there.
    """
    prev = None
    for p in curve:
        if p["val_bpb"] <= target:
            if prev is None:
                return float(p["tokens"])
            (t0, y0), (t1, y1) = (prev["tokens"], prev["val_bpb"]), (p["tokens"], p["val_bpb"])
            return t0 + (t1 - t0) * ((y0 - target) / (y0 - y1) if y0 != y1 else 1.0)
        prev = p
    return None


@dataclass
class Claim:
    title: str
    source: str
    slug: str
    setting: str
    measured: list[str]
    held: bool | None
    verdict: str


def _by_seed(summary: Summary | None) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in summary.ok} if summary else {}


def claims(summaries: dict[str, Summary]) -> list[Claim]:
    """The seed papers' claims, evaluated on the runs that exist (``held`` None: not enough runs)."""
    out = []
    ot, switch, gshard = (summaries.get(n) for n in ("efficient_routing_ot", "switch_base", "gshard_top2"))
    seeds = sorted(set(_by_seed(ot)) & set(_by_seed(switch)) & set(_by_seed(gshard)))
    measured: list[str] = []
    ratios: dict[str, list[float]] = {"switch_base": [], "gshard_top2": []}
    for s in seeds:
        runs = {n: _by_seed(summaries[n])[s] for n in ("efficient_routing_ot", "switch_base", "gshard_top2")}
        target = max(r["final"]["val_bpb"] for r in runs.values())  # a level every run reaches
        t_ot = tokens_to_reach(runs["efficient_routing_ot"]["curve"], target)
        for base in ratios:
            t_b = tokens_to_reach(runs[base]["curve"], target)
            if t_ot and t_b:
                ratios[base].append(t_b / t_ot)
    held = None
    if all(ratios.values()):
        parts = []
        for base, rs in ratios.items():
            m, sd = _mean_std(rs)
            parts.append(f"{m:.2f}× ± {sd:.2f} against `{base}`")
        measured.append(
            "Tokens to reach the worst final validation bits per byte of the three, `switch_base` and "
            f"`gshard_top2` over `efficient_routing_ot`: {'; '.join(parts)} ({len(seeds)} seeds; "
            "per seed: "
            + ", ".join(f"{r:.2f}" for r in ratios["switch_base"])
            + " and "
            + ", ".join(f"{r:.2f}" for r in ratios["gshard_top2"])
            + ")."
        )
        held = all(_mean_std(rs)[0] >= 2.0 for rs in ratios.values())
    out.append(
        Claim(
            title=(
                "Sinkhorn optimal-transport routing converges more than 2× faster than GShard and "
                "Switch gating"
            ),
            source="IJCNN 2024, “Efficient Routing in Sparse Mixture-of-Experts”",
            slug="efficient-routing-sparse-moe",
            setting=(
                "`efficient_routing_ot` against `switch_base` and `gshard_top2`, same tokens and schedule"
            ),
            measured=measured or ["Not enough runs: each of the three needs the same seeds."],
            held=held,
            verdict=_verdict(held, "at least 2× fewer tokens against both"),
        )
    )
    ssr = summaries.get("ssr")
    others = {n: summaries.get(n) for n in ("efficient_routing_ot", "s_base")}
    measured, held = [], None
    if ssr and ssr.ok and all(o and o.ok for o in others.values()):
        rows = []
        for n, s in (("ssr", ssr), *others.items()):
            m, sd = s.final("val_bpb")
            secs = s.speed("train_seconds")
            rows.append((n, m, sd, secs))
        measured.append(
            "Final validation bits per byte and training time: "
            + "; ".join(f"`{n}` {m:.3f} ± {sd:.3f} in {secs:.0f} s" for n, m, sd, secs in rows)
            + f" (seeds: {', '.join(str(x) for x in ssr.seeds)})."
        )
        better = all(rows[0][1] < r[1] for r in rows[1:])
        faster = all(rows[0][3] < r[3] for r in rows[1:])
        held = better and faster
        measured.append(
            f"SSR's loss is {'lower' if better else 'not lower'} than every other Sinkhorn-based router's "
            f"and its training time {'shorter' if faster else 'not shorter'}."
        )
    out.append(
        Claim(
            title=(
                "Selective Sinkhorn Routing reaches higher accuracy with less training time than other "
                "Sinkhorn-based routing"
            ),
            source="arXiv 2511.08972, “Selective Sinkhorn Routing”",
            slug="selective-sinkhorn-routing",
            setting=(
                "`ssr` against `efficient_routing_ot` (Sinkhorn OT) and `s_base` (S-BASE), validation "
                "bits per byte as accuracy"
            ),
            measured=measured or ["Not enough runs."],
            held=held,
            verdict=_verdict(held, "lower loss and shorter training than both"),
        )
    )
    return out


def _verdict(held: bool | None, what: str) -> str:
    if held is None:
        return "Not measured yet."
    return f"Held at this scale ({what})." if held else f"Did not hold at this scale (needed: {what})."
