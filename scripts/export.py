#!/usr/bin/env python
"""Export the whole catalog as one JSON document.

Usage (from the repository root)::

    python scripts/export.py                    # JSON on stdout
    python scripts/export.py -o catalog.json    # into a file

The document holds the taxonomy tree, every work with its curated fields and its fetched OpenAlex
record (or null), a generation timestamp and headline counts; see ``catalog.export.export_catalog()``.
"""

from __future__ import annotations

import _checkout  # noqa: F401  (first: this checkout's packages and data)

# isort: split

import argparse
import json
import logging
import sys
from pathlib import Path

from catalog import DATA_DIR, collect
from catalog.export import export_catalog

log = logging.getLogger("export")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write the MoE Atlas catalog (taxonomy, works, fetched records, counts) as JSON.",
    )
    parser.add_argument(
        "-o", "--output", type=Path, default=None, help="output file (default: standard output)"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=DATA_DIR, help="catalog data directory (default: %(default)s)"
    )
    parser.add_argument("--compact", action="store_true", help="no indentation")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a directory")

    cat, problems = collect(args.data_dir)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"not exported: {len(problems)} problem(s); run scripts/validate.py", file=sys.stderr)
        return 1
    assert cat is not None
    data = export_catalog(cat)
    text = json.dumps(data, ensure_ascii=False, indent=None if args.compact else 2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
        log.info("wrote %s (%d works, %d bytes)", args.output, len(data["works"]), len(text.encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
