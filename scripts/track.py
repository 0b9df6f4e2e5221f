#!/usr/bin/env python
"""List new works citing catalog works that the catalog does not hold yet (candidates to review).

Asks OpenAlex for works citing the catalog's works (cites:W1|W2|... OR filters of 100 ids,
published on or after --since, newest first), leaves out works already in the catalog, ranks
the rest by how many catalog works they cite, prints the top of the list and writes the whole
report (Markdown, or JSON when --out ends in .json; the site renders a JSON report written to
catalog/data/tracking.json as its "Tracking" page). Curated and fetched files are only read;
works need a known OpenAlex id (pinned, or remembered by scripts/refresh.py) to be tracked.

--draft OPENALEX_ID writes a skeleton curated file catalog/data/works/<slug>.yaml for one
candidate, filled from its OpenAlex record, for a person to complete and verify (it never
overwrites a file, and stays invalid until it is placed in the taxonomy).

Environment: OPENALEX_API_KEY, OPENALEX_EMAIL, OPENALEX_URL, as for scripts/refresh.py.
Exit status: 0 done; 1 a request failed; 2 bad arguments or catalog; 3 stopped (OpenAlex
unreachable, budget spent).
"""

from __future__ import annotations

import _checkout  # noqa: F401  (first: this checkout's packages and data)

# isort: split

import argparse
import datetime as dt
import json
import logging
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

import requests
import yaml
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from catalog.errors import CatalogError
from catalog.fetched_store import write_atomic
from catalog.loader import DATA_DIR, read_works
from catalog.openalex import Backoff, ConfigError, OpenAlexClient, RequestFailed, Settings, StopRun
from catalog.refresh import load_fetched, load_works
from catalog.track import TrackResult, find_candidates

log = logging.getLogger("track")
DEFAULT_OUT = Path("artifacts") / "tracked-candidates.md"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="track.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    when = p.add_mutually_exclusive_group()
    when.add_argument(
        "--since", type=dt.date.fromisoformat, metavar="YYYY-MM-DD", help="earliest publication date"
    )
    when.add_argument(
        "--days",
        type=int,
        default=90,
        metavar="N",
        help="look back N days (default 90; dates in OpenAlex lag)",
    )
    p.add_argument(
        "--data-dir", type=Path, default=DATA_DIR, metavar="DIR", help=f"catalog data ({DATA_DIR})"
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, metavar="FILE", help=f"report file ({DEFAULT_OUT})"
    )
    p.add_argument(
        "--max-per-group", type=int, default=1000, metavar="N", help="citing works read per 100 catalog works"
    )
    p.add_argument("--show", type=int, default=25, metavar="N", help="candidates printed (25)")
    p.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="seconds to wait for an answer (30)"
    )
    p.add_argument("--attempts", type=int, default=5, metavar="N", help="tries per request (5)")
    p.add_argument("--backoff", type=float, default=1.0, metavar="S", help="first retry delay, doubled (1)")
    p.add_argument(
        "--draft",
        metavar="OPENALEX_ID",
        help="write a skeleton curated file for this candidate (e.g. W4402351149) instead of tracking",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return p


_STOP_WORDS = {"a", "an", "the", "of", "for", "and", "in", "on", "to", "with", "via", "towards"}


def draft_slug(title: str, year: int | None) -> str:
    """A slug from the first significant words of a title (``routing-free-moe-2026``)."""
    folded = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode().lower()
    words = [w for w in re.split(r"[^a-z0-9]+", folded) if w and w not in _STOP_WORDS]
    stem = "-".join(words[:4]) or "work"
    return f"{stem}-{year}" if year else stem


def _author_name(a) -> str | None:
    return (a.author.display_name if a.author else None) or a.raw_author_name


def draft_text(work, today: dt.date) -> tuple[str, str]:
    """``(slug, YAML text)`` of the skeleton for one OpenAlex work payload."""
    title = work.title_text or ""
    year = work.publication_year
    slug = draft_slug(title, year)
    ids: dict[str, str] = {"openalex": work.id}
    doi = work.doi_bare
    if doi and doi.startswith("10.48550/arxiv."):
        ids["arxiv"] = doi.removeprefix("10.48550/arxiv.")
    elif doi:
        ids["doi"] = doi
    doc = {
        "slug": slug,
        "title": title,
        "kind": "paper",
        "year": year or today.year,
        **({"date": work.publication_date.isoformat()} if work.publication_date else {}),
        "authors": [
            name
            for a in work.authorships
            if (name := (a.author.display_name if a.author else None) or a.raw_author_name)
        ],
        "venue": "arXiv",
        "ids": ids,
        "provenance": "tracked",
        "added": today.isoformat(),
        "placements": [],
        "notes": "",
        "implementations": [],
    }
    head = (
        f"# Draft written by scripts/track.py --draft {work.id} on {today.isoformat()} from OpenAlex.\n"
        "# A person completes it from the paper's own pages before it joins the catalog:\n"
        "# - check the title, the date (first release, e.g. arXiv v1), the authors (order, spelling)\n"
        "#   and the venue ('arXiv' or '<venue> <year>' once a peer-reviewed version is confirmed);\n"
        "# - add 'sources:' (the URL each fact was read from), 'code:' and 'pdf:' where they exist;\n"
        "# - place it under taxonomy nodes (catalog/data/taxonomy.yaml) and write 'notes' in your own\n"
        "#   words; then run python scripts/validate.py (it fails until 'placements' is filled).\n"
    )
    return slug, head + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100)


def write_draft(args: argparse.Namespace, client: OpenAlexClient, works) -> int:
    key = args.draft.strip()
    if not re.fullmatch(r"[Ww]\d+", key):
        log.error("--draft %r: expected an OpenAlex work id such as W4402351149", key)
        return 2
    key = key.upper()
    pinned = [w.slug for w in works if w.ids.openalex == key]
    if pinned:
        log.error("--draft %s: already in the catalog as %s", key, pinned[0])
        return 2
    lookup = client.get_work(key)
    if lookup is None:
        log.error("--draft %s: OpenAlex has no such work", key)
        return 1
    slug, text = draft_text(lookup.work, dt.datetime.now(dt.timezone.utc).date())
    path = Path(args.data_dir) / "works" / f"{slug}.yaml"
    try:
        with open(path, "x", encoding="utf-8") as fh:  # never overwrite
            fh.write(text)
    except FileExistsError:
        log.error("--draft %s: %s exists; not overwriting it", key, path)
        return 2
    except OSError as exc:
        log.error("--draft %s: cannot write %s: %s", key, path, exc.strerror or exc)
        return 2
    print(f"wrote {path}: complete it (placements, sources, notes), then run scripts/validate.py")
    return 0


def markdown(result: TrackResult, since: dt.date) -> str:
    lines = [
        f"# New works citing the catalog (published since {since.isoformat()})",
        "",
        f"{len(result.candidates)} candidates from {result.seen} citing works of {result.tracked_ids} "
        "catalog works. Review each before adding it as a curated work.",
        "",
        "| cites | published | title | venue | OpenAlex | DOI |",
        "|---:|---|---|---|---|---|",
    ]
    for c in result.candidates:
        title = c.title.replace("|", "\\|").replace("\n", " ")
        doi = f"[{c.doi}](https://doi.org/{c.doi})" if c.doi else ""
        lines.append(
            f"| {len(c.cites)} | {c.publication_date or ''} | {title} | {(c.venue or '').replace('|', '/')} "
            f"| [{c.openalex_id}](https://openalex.org/{c.openalex_id}) | {doi} |"
        )
    if result.untracked:
        lines += ["", f"Not tracked (no OpenAlex id yet): {', '.join(result.untracked)}"]
    return "\n".join(lines) + "\n"


def report_text(result: TrackResult, since: dt.date, out: Path) -> str:
    if out.suffix == ".json":
        doc = {
            "since": since.isoformat(),
            "tracked_works": result.tracked_ids,
            "citing_works_seen": result.seen,
            "untracked": result.untracked,
            "candidates": [c.as_dict() for c in result.candidates],
        }
        return json.dumps(doc, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    return markdown(result, since)


def main(
    argv: Sequence[str] | None = None,
    *,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("pyalex").setLevel(logging.INFO)
    since = args.since or (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=args.days))
    try:
        # a draft needs only the pinned ids, and an unfinished draft must not block the next one
        works = list(read_works(args.data_dir, []).values()) if args.draft else load_works(args.data_dir)
        fetched = load_fetched(args.data_dir)
        settings = Settings.from_env(
            timeout=args.timeout, backoff=Backoff(attempts=args.attempts, base=args.backoff)
        )
    except (CatalogError, ConfigError) as exc:
        log.error("%s", exc)
        return 2
    client = OpenAlexClient(settings, session=session, sleep=sleep)
    try:
        if args.draft:
            return write_draft(args, client, works)
        with tqdm(desc="catalog works tracked", unit="work", disable=None) as bar:
            result = find_candidates(
                client,
                works,
                fetched,
                since=since,
                max_per_request_group=args.max_per_group,
                on_group=bar.update,
            )
    except StopRun as exc:
        log.error("%s", exc)
        return 3
    except RequestFailed as exc:
        log.error("%s", exc)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, report_text(result, since, args.out))
    table = Table(title=f"New works citing the catalog since {since.isoformat()}", header_style="bold")
    for col in ("cites", "published", "title", "OpenAlex"):
        table.add_column(col, overflow="fold")
    for c in result.candidates[: args.show]:
        table.add_row(", ".join(sorted(c.cites)), str(c.publication_date or ""), c.title, c.openalex_id)
    console = Console(highlight=False, soft_wrap=True)
    console.print(table)
    console.print(
        f"{len(result.candidates)} candidates ({result.seen} citing works of {result.tracked_ids} "
        f"tracked works, {client.stats.list} list requests); report: {args.out}"
    )
    if result.untracked:
        console.print(f"{len(result.untracked)} works have no OpenAlex id yet; run scripts/refresh.py first.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
