#!/usr/bin/env python
"""Check the catalog files (taxonomy, works, fetched records) and report every problem at once.

Usage (from the repository root)::

    python scripts/validate.py                      # the committed catalog
    python scripts/validate.py --data-dir DIR       # another copy of catalog/data
    python scripts/validate.py --no-imports         # skip importing the implementation paths

Exit status 0 when the catalog is clean (a short summary is printed), 1 when there are problems
(each printed as ``file:line [field]: message``), 2 on bad arguments.
"""

from __future__ import annotations

import _checkout  # noqa: F401  (first: this checkout's packages and data)

# isort: split

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from catalog import DATA_DIR, Catalog, Problem, collect
from catalog.export import export_counts
from catalog.quality import report as quality_report

log = logging.getLogger("validate")


def _where(path: Path) -> str:
    absolute = Path(os.path.abspath(path))  # not resolve(): a symlink loop must not raise here
    return os.path.relpath(absolute) if absolute.is_relative_to(Path.cwd()) else str(path)


def format_problem(p: Problem) -> str:
    where = _where(p.file) + (f":{p.line}" if p.line is not None else "")
    field = f" [{p.field}]" if p.field else ""
    return f"{where}{field}: {p.message}"


def print_summary(cat: Catalog) -> None:
    c = export_counts(cat)
    print(f"catalog OK: {_where(cat.data_dir)}")
    by_provenance = ", ".join(f"{k} {v}" for k, v in c["works_by_provenance"].items())
    print(f"  works            {c['works']:4d}  ({by_provenance})")
    survey, ext = c["survey_nodes"], c["extension_nodes"]
    print(f"  taxonomy nodes   {c['nodes']:4d}  ({survey} from the survey, {ext} extension)")
    print(f"  errata           {c['errata']:4d}")
    print(f"  fetched records  {c['fetched']:4d}")
    print("  works per top-level branch (a work may sit in several):")
    for title, n in c["works_by_branch"].items():
        print(f"    {title:<14} {n:4d}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Validate the MoE Atlas catalog and print every problem found, each with its file "
        "and line or field. Exit status 0 when clean, 1 otherwise.",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DATA_DIR,
        help="catalog data directory holding taxonomy.yaml, works/ and fetched/ (default: %(default)s)",
    )
    parser.add_argument(
        "--no-imports",
        action="store_true",
        help="do not import the dotted paths listed under 'implementations' (faster; skips that check)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a directory")

    start = time.perf_counter()
    log.info("reading %s (implementation imports: %s)", args.data_dir, "off" if args.no_imports else "on")
    cat, problems = collect(args.data_dir, check_imports=not args.no_imports)
    log.info("checked in %.3f s", time.perf_counter() - start)
    if problems:
        ordered = sorted(problems, key=lambda p: (str(p.file), p.line or 0, p.field or ""))
        for p in ordered:
            print(format_problem(p))
        files = len({p.file for p in problems})
        print(f"{len(problems)} problem(s) in {files} file(s)", file=sys.stderr)
        return 1
    assert cat is not None
    print_summary(cat)
    disagreements = quality_report(cat.works, cat.fetched)
    if disagreements:
        print(f"data-quality report: {len(disagreements)} disagreement(s) between curated facts and OpenAlex")
        print("  (not errors: the curated facts are what the site shows; check each against the paper)")
        for d in disagreements:
            print(f"  {d}")
    else:
        print("data-quality report: curated authors, year and venue agree with every fetched record")
    return 0


if __name__ == "__main__":
    sys.exit(main())
