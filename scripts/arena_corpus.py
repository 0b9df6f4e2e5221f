#!/usr/bin/env python
"""Prepare the routing arena's corpus: English and German prose and Python source, from Debian.

Downloads ``fortunes``, ``fortunes-de`` and ``libpython3.11-stdlib`` with ``apt-get download``,
extracts them, splits every document into train or validation by a hash of its name, and writes
``<domain>.{train,val}.bin`` and ``manifest.json`` (package versions and sha256, every file's
sha256 and document counts) into the corpus directory. ``--sample`` then writes the few-KB slice
the tests use. See ``scripts/arena/corpus.py`` for the domains and the split rule.

Examples:
  python scripts/arena_corpus.py                       # -> artifacts/arena-corpus/
  python scripts/arena_corpus.py --out /tmp/corpus --debs /tmp/debs
  python scripts/arena_corpus.py --sample tests/arena_sample
"""

from __future__ import annotations

import _checkout

# isort: split

import argparse
import logging
import sys
from pathlib import Path

from scripts.arena.corpus import prepare, write_sample

log = logging.getLogger("arena_corpus")
DEFAULT_OUT = _checkout.ROOT / "artifacts" / "arena-corpus"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"corpus directory (default: {DEFAULT_OUT})")
    p.add_argument("--debs", type=Path, default=None, help="where to keep (or find) the .deb files")
    p.add_argument("--sample", type=Path, default=None, help="also write the test sample to this directory")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        manifest = prepare(args.out, args.debs)
    except (RuntimeError, OSError) as exc:
        log.error("%s", exc)
        return 1
    for key, size in sorted(manifest["sizes"].items()):
        log.info("%-9s %6d documents %10d bytes", key, size["documents"], size["bytes"])
    log.info("corpus %s (manifest %s)", args.out, manifest["manifest_sha256"][:12])
    if args.sample is not None:
        sample = write_sample(args.out, args.sample)
        log.info("sample %s (manifest %s)", args.sample, sample["manifest_sha256"][:12])
    return 0


if __name__ == "__main__":
    sys.exit(main())
