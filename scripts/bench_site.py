#!/usr/bin/env python3
"""Time the site: page generation and the full MkDocs build, for the real and a synthetic catalog.

The synthetic catalog keeps the real taxonomy and adds N works (default 10,000) with the shape of
real ones: 1-3 placements, half of them fetched with authors, citation trends, abstracts and
in-catalog references, a few errata. Targets: the real catalog builds in under 30 s on 2 cores;
the generator alone handles 10,000 works in under 10 s.

Examples:
  python scripts/bench_site.py                      # real build + 10,000-work generation
  python scripts/bench_site.py --synthetic-build    # also build the 10,000-work site (minutes)
  python scripts/bench_site.py --works 2000 --repeat 3
"""

from __future__ import annotations

import _checkout  # noqa: F401  (first: this checkout's packages and data)

# isort: split

import argparse
import datetime as dt
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import catalog  # noqa: E402
from catalog import Author, Catalog, Erratum, FetchedRecord, Identifiers, Work, YearCount  # noqa: E402

log = logging.getLogger("bench_site")
WORDS = [
    "sparse",
    "mixture",
    "experts",
    "routing",
    "gating",
    "token",
    "expert",
    "choice",
    "balanced",
    "capacity",
    "load",
    "scalable",
    "efficient",
    "transformer",
    "language",
    "vision",
    "multimodal",
    "adaptive",
    "dynamic",
    "hierarchical",
    "soft",
    "hash",
    "learned",
    "optimal",
    "transport",
    "sinkhorn",
    "auxiliary",
    "loss",
    "free",
    "dropless",
    "parallel",
    "system",
    "inference",
]


def synthetic_catalog(n: int, seed: int = 0) -> Catalog:
    """The real taxonomy plus ``n`` generated works (about half of them with fetched records)."""
    real = catalog.load()
    rng = random.Random(seed)
    leaves = [nid for nid in real.taxonomy.nodes if not real.taxonomy.children(nid)]
    works: list[Work] = []
    fetched: dict[str, FetchedRecord] = {}
    fetched_at = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    for i in range(n):
        slug = f"synthetic-{i:05d}"
        year = rng.randint(2017, 2026)
        title = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize()
        errata = []
        if rng.random() < 0.02:
            errata = [Erratum(field="title", survey_says=title.upper(), corrected=title, reason="Typo.")]
        works.append(
            Work(
                slug=slug,
                title=title,
                year=year,
                venue=f"ArXiv {year}",
                ids=Identifiers(arxiv=f"{year % 100:02d}{rng.randint(1, 12):02d}.{10000 + i:05d}"),
                provenance="tracked",
                placements=rng.sample(leaves, rng.randint(1, 3)),
                errata=errata,
            )
        )
        if rng.random() < 0.5:
            counts = [YearCount(year=y, cited_by_count=rng.randint(0, 300)) for y in range(year, 2027)]
            refs = [f"synthetic-{j:05d}" for j in rng.sample(range(max(i, 1)), min(i, rng.randint(0, 10)))]
            fetched[slug] = FetchedRecord(
                slug=slug,
                openalex_id=f"W{100000 + i}",
                resolved_by="arxiv-doi",
                title=title,
                publication_year=year,
                venue="Synthetic Conference",
                authors=[Author(name=f"Author {rng.randint(1, 5000)}") for _ in range(rng.randint(1, 8))],
                cited_by_count=sum(c.cited_by_count for c in counts),
                counts_by_year=counts,
                referenced_in_catalog=refs,
                abstract=" ".join(rng.choice(WORDS) for _ in range(160)),
                fetched_at=fetched_at,
            )
    works.sort(key=lambda w: w.sort_key)
    return Catalog(real.taxonomy, works, fetched, real.data_dir)


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_site.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--works", type=int, default=10_000, help="synthetic catalog size (default 10000)")
    parser.add_argument("--repeat", type=int, default=1, help="best of N for generation timings (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic catalog")
    parser.add_argument("--skip-real", action="store_true", help="do not build the real catalog")
    parser.add_argument(
        "--synthetic-build", action="store_true", help="also run MkDocs on the synthetic catalog (slow)"
    )
    args = parser.parse_args(argv)
    if args.works < 1 or args.repeat < 1:
        parser.error("--works and --repeat must be positive")
    logging.basicConfig(level=logging.INFO, format="%(levelname)-7s - %(message)s")
    for noisy in ("mkdocs", "scripts.sitegen", "mkdocs_autorefs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from scripts.sitegen import discover, generate
    from scripts.sitegen.build import build_site, stage

    rows: list[tuple[str, str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-site-") as tmp:
        tmp_path = Path(tmp)
        if not args.skip_real:
            real = catalog.load()
            log.info("real catalog: %d works; generating pages", len(real.works))
            families = discover(measure=False)
            t, _ = timed(lambda: generate(real, stage(tmp_path / "real-docs"), families), args.repeat)
            rows.append(("real", f"{len(real.works)} works", t, "generation only (no router runs)"))
            log.info("real catalog: full build (routers measured, MkDocs strict)")
            t, res = timed(lambda: build_site(real, tmp_path / "real-public", stage(tmp_path / "real-docs")))
            detail = (
                f"routers {res.routers_s:.1f} s, generation {res.generate_s:.1f} s, "
                f"MkDocs {res.mkdocs_s:.1f} s"
            )
            rows.append(("real", f"{len(real.works)} works", t, f"full build: {detail}"))

        log.info("synthetic catalog: %d works", args.works)
        t_make, synth = timed(lambda: synthetic_catalog(args.works, args.seed))
        rows.append(
            ("synthetic", f"{args.works} works", t_make, "building the catalog object (not generation)")
        )
        t, gen = timed(lambda: generate(synth, stage(tmp_path / "syn-docs")), args.repeat)
        rows.append(("synthetic", f"{args.works} works", t, f"generation only: {len(gen.files)} files"))
        if args.synthetic_build:
            log.info("synthetic catalog: full MkDocs build (this takes minutes)")
            t, res = timed(
                lambda: build_site(
                    synth, tmp_path / "syn-public", stage(tmp_path / "syn-docs"), measure=False
                )
            )
            rows.append(("synthetic", f"{args.works} works", t, f"full build, MkDocs {res.mkdocs_s:.1f} s"))

    width = max(len(r[3]) for r in rows)
    print(f"\n{'catalog':<10} {'size':<13} {'seconds':>8}  what")
    print("-" * (35 + width))
    for name, size, secs, what in rows:
        print(f"{name:<10} {size:<13} {secs:8.2f}  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
