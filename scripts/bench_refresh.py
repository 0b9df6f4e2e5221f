#!/usr/bin/env python
"""Benchmark the OpenAlex refresh on a synthetic catalog served by a local OpenAlex look-alike.

Builds a catalog of N works with pinned OpenAlex ids in a temporary directory, serves
OpenAlex-format answers (variants of the real seed record) from an HTTP server on 127.0.0.1,
then times a first refresh (every record written) and a second one (every record unchanged),
printing the HTTP requests made and the wall time of each. Targets for 1,000 works: at most 10
list requests and under 30 s per run; the exit status is 1 when a target is missed.

Needs the dev dependencies (pytest-httpserver) and reuses the test suite's server code.
"""

from __future__ import annotations

import _checkout  # noqa: F401  (first: this checkout's packages and data)

# isort: split

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from openalex_server import FakeOpenAlex, make_work, seed_payload, serve, write_catalog  # noqa: E402

from catalog.openalex import Backoff, OpenAlexClient, Settings  # noqa: E402
from catalog.refresh import Refresh, Summary, load_fetched, load_works, plan  # noqa: E402

log = logging.getLogger("bench_refresh")
MAX_LIST_REQUESTS_PER_1000 = 10
MAX_SECONDS = 30.0


def build(data_dir: Path, fake: FakeOpenAlex, n: int) -> None:
    seed = seed_payload()
    works = []
    for i in tqdm(range(n), desc="catalog", unit="work", disable=None):
        wid = 10_000 + i
        title = f"Synthetic sparse routing study {wid}"
        fake.add(make_work(wid, title, year=2020 + i % 6, counts={2024: i % 5, 2026: i % 11}, base=seed))
        works.append(
            {"slug": f"work-{wid}", "title": title, "year": 2020 + i % 6, "ids": {"openalex": f"W{wid}"}}
        )
    write_catalog(data_dir, works)


def run_once(data_dir: Path, url: str, label: str) -> tuple[Summary, float]:
    start = time.perf_counter()
    works = load_works(data_dir)
    fetched = load_fetched(data_dir)
    items = plan(works, fetched)
    client = OpenAlexClient(
        Settings(base_url=url, api_key="bench-key", backoff=Backoff(attempts=3, base=0.1))
    )
    with tqdm(total=len(items), desc=label, unit="work", disable=None) as bar:
        summary = Refresh(data_dir, client, on_done=lambda outcome: bar.update(1)).run(items, works, fetched)
    return summary, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--works", type=int, default=1000, metavar="N", help="works in the synthetic catalog (1000)"
    )
    p.add_argument("--keep", type=Path, metavar="DIR", help="build the catalog in DIR and keep it")
    p.add_argument("-v", "--verbose", action="store_true", help="log requests")
    args = p.parse_args(argv)
    if args.works < 1:
        p.error(f"--works must be at least 1, got {args.works}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-refresh-") as tmp:
        data_dir = args.keep or Path(tmp) / "data"
        fake = FakeOpenAlex()
        t0 = time.perf_counter()
        build(data_dir, fake, args.works)
        log.info("built %d works in %.1f s", args.works, time.perf_counter() - t0)
        rows = []
        with serve(fake) as url:
            for label in ("first run", "second run"):
                fake.log.clear()
                summary, seconds = run_once(data_dir, url, label)
                rows.append((label, summary, seconds, len(fake.requests_of("list"))))

    allowed = math.ceil(args.works / 1000 * MAX_LIST_REQUESTS_PER_1000)
    table = Table(title=f"Refresh of {args.works} pinned works against a local OpenAlex look-alike")
    for col in ("run", "updated", "unchanged", "failed", "list requests", "all requests", "wall time"):
        table.add_column(col, justify="right")
    ok = True
    for label, summary, seconds, lists in rows:
        ok &= lists <= allowed and seconds < MAX_SECONDS and summary.ok
        table.add_row(
            label,
            str(summary.count("updated")),
            str(summary.count("unchanged")),
            str(summary.count("failed")),
            str(lists),
            str(summary.requests.total),
            f"{seconds:.2f} s",
        )
    console = Console(highlight=False)
    console.print(table)
    console.print(
        f"targets: ≤ {allowed} list requests and < {MAX_SECONDS:.0f} s per run: {'met' if ok else 'MISSED'} "
        f"({os.cpu_count()} CPUs, Python {sys.version.split()[0]})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
