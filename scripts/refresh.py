#!/usr/bin/env python
"""Refresh the OpenAlex layer of the catalog (catalog/data/fetched/<slug>.json).

Resolves every curated work to an OpenAlex work id (pinned id, remembered id, DOI, arXiv DOI,
strict title search), fetches the resolved works 100 per request, and stores one JSON record
per work atomically. Curated files (catalog/data/works/*.yaml) are only read.

Environment:
  OPENALEX_API_KEY  free key from https://openalex.org/settings/api (required by OpenAlex
                    since February 2026; without it the daily budget is tiny)
  OPENALEX_EMAIL    contact address sent in the From header (optional)
  OPENALEX_URL      base URL of the API (default https://api.openalex.org; e.g. a mirror)

Exit status:
  0    done
  1    some works failed (each named; the others were stored)
  2    bad arguments, or a catalog file that cannot be read (named, with its line)
  3    stopped early by OpenAlex: unreachable, too many failed requests in a row, daily budget
       spent, a Retry-After longer than --max-wait, key missing or refused (401/403)
  4    stopped early: a record could not be written (disk full, permission denied; file named)
  130  interrupted (Ctrl-C)
Whatever the status, every record already fetched is kept, and each file is old or new.
"""

from __future__ import annotations

import _checkout  # noqa: F401  (first: this checkout's packages and data)

# isort: split

import argparse
import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import requests
from rich.console import Console
from rich.table import Table
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from catalog.errors import CatalogError
from catalog.fetched_store import parse_utc, read_checked
from catalog.loader import DATA_DIR
from catalog.openalex import Backoff, ConfigError, OpenAlexClient, Settings
from catalog.openalex_payload import PayloadError
from catalog.refresh import Refresh, Summary, import_payload, load_fetched, load_works, plan, select

log = logging.getLogger("refresh")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_WRITE, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
_EXIT_FOR_STOP = {"openalex": EXIT_STOPPED, "write": EXIT_WRITE, "interrupted": EXIT_INTERRUPTED}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="refresh.py",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--only", nargs="+", metavar="SLUG", help="refresh only these works (by slug)")
    p.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        help="refresh only works not fetched or checked within the last DAYS days (never fetched ones too)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be fetched, send nothing, write nothing"
    )
    p.add_argument(
        "--re-resolve",
        action="store_true",
        help="look ids up again instead of reusing ids remembered from earlier runs (pinned ids always win)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DATA_DIR,
        metavar="DIR",
        help=f"catalog data directory holding works/ and fetched/ (default: {DATA_DIR})",
    )
    p.add_argument(
        "--import-payload",
        nargs=2,
        metavar=("SLUG", "FILE"),
        help="store a saved OpenAlex work JSON as the record of SLUG, with no request (fetched_at = "
        "its updated_date unless --fetched-at is given)",
    )
    p.add_argument(
        "--fetched-at", metavar="ISO-TIME", help="capture time for --import-payload (UTC if no offset)"
    )
    p.add_argument(
        "--timeout",
        type=_positive,
        default=30.0,
        metavar="S",
        help="seconds one request may take, from connecting to the last byte of the answer (30)",
    )
    p.add_argument(
        "--max-wait",
        type=_non_negative,
        default=300.0,
        metavar="S",
        help="longest Retry-After to wait out; a longer one stops the run with status 3 (300)",
    )
    p.add_argument(
        "--give-up-after",
        type=int,
        default=3,
        metavar="N",
        help="stop the run (status 3) after N requests in a row fail even after their retries (3)",
    )
    p.add_argument(
        "--attempts", type=int, default=5, metavar="N", help="tries per request before giving up (5)"
    )
    p.add_argument(
        "--backoff",
        type=float,
        default=1.0,
        metavar="S",
        help="first retry delay in seconds, doubled per retry (1)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every resolution and request")
    return p


def _positive(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be zero or more seconds, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)
    # urllib3 logs full request URLs at DEBUG; keep it quiet so nothing sensitive reaches a log.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("pyalex").setLevel(logging.INFO)


def summary_table(summary: Summary) -> Table:
    table = Table(title="OpenAlex refresh", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("works", justify="right")
    selected = len(summary.outcomes)
    rows = [
        ("selected", selected),
        ("resolved (looked up now)", summary.resolved),
        ("updated", summary.count("updated")),
        ("unchanged", summary.count("unchanged")),
        ("unresolved", summary.count("unresolved")),
        ("ambiguous", summary.count("ambiguous")),
        ("failed", summary.count("failed")),
        ("not fetched (stopped)", summary.count("not-fetched")),
        ("merged ids detected", summary.merged),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    r = summary.requests
    table.add_section()
    table.add_row(
        "HTTP requests",
        f"{r.total} ({r.list} list, {r.singleton} single, {r.search} search; {r.retries} retries)",
    )
    table.add_row("time", f"{summary.seconds:.2f} s")
    if summary.rate_limit is not None:
        table.add_row("budget remaining", summary.rate_limit.describe())
    return table


def problems_table(summary: Summary, max_slugs: int = 6) -> Table | None:
    """Failed, ambiguous and unresolved works, one row per distinct reason."""
    groups: dict[tuple[str, str], list[str]] = {}
    for o in summary.outcomes:
        if o.status in ("failed", "ambiguous", "unresolved"):
            groups.setdefault((o.status, o.message), []).append(o.slug)
    if not groups:
        return None
    table = Table(title="Works needing attention", show_header=True, header_style="bold")
    for col in ("works", "status", "detail"):
        table.add_column(col, overflow="fold")
    for (status, message), slugs in groups.items():
        shown = ", ".join(slugs[:max_slugs])
        if len(slugs) > max_slugs:
            shown += f" and {len(slugs) - max_slugs} more"
        table.add_row(shown, status, message)
    return table


def do_import(args: argparse.Namespace) -> int:
    slug, file = args.import_payload
    try:
        payload = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.error("%s: cannot read a JSON payload: %s", file, exc)
        return EXIT_USAGE
    try:
        when = parse_utc(args.fetched_at) if args.fetched_at else None
        record, outcome = import_payload(args.data_dir, slug, payload, fetched_at=when)
    except (ValueError, PayloadError, CatalogError) as exc:
        log.error("--import-payload %s %s: %s", slug, file, exc)
        return EXIT_USAGE
    how = f"{record.openalex_id} ({record.resolved_by})"
    print(f"{outcome.status}: {slug} <- {how}, fetched_at {record.fetched_at.isoformat()}")
    return EXIT_OK


def main(
    argv: Sequence[str] | None = None,
    *,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return _main(args, session, sleep)
    except KeyboardInterrupt:
        log.error("interrupted (Ctrl-C); every record written so far is kept")
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line, not a traceback (-v logs it)
        log.debug("traceback", exc_info=True)
        log.error(
            "refresh stopped by an unexpected error: %s: %s (records written before it are kept; "
            "run with -v for the traceback)",
            type(exc).__name__,
            exc,
        )
        return EXIT_FAILED


def _main(args: argparse.Namespace, session: requests.Session | None, sleep: Callable[[float], None]) -> int:
    if args.import_payload:
        return do_import(args)
    if args.fetched_at:
        log.error("--fetched-at only goes with --import-payload")
        return EXIT_USAGE
    now = dt.datetime.now(dt.timezone.utc)
    try:
        works = load_works(args.data_dir)
        fetched = load_fetched(args.data_dir)
        checked = read_checked(args.data_dir)
        chosen = select(works, fetched, checked, slugs=args.only, older_than_days=args.older_than, now=now)
    except (CatalogError, ValueError) as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    items = plan(chosen, fetched, re_resolve=args.re_resolve)
    console = Console(highlight=False, soft_wrap=True)
    if args.dry_run:
        print_plan(console, items)
        return EXIT_OK
    try:
        settings = Settings.from_env(
            timeout=args.timeout,
            give_up_after=args.give_up_after,
            backoff=Backoff(attempts=args.attempts, base=args.backoff, max_retry_after=args.max_wait),
        )
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    client = OpenAlexClient(settings, session=session, sleep=sleep)
    with tqdm(total=len(items), desc="refresh", unit="work", disable=None) as bar, logging_redirect_tqdm():
        run = Refresh(args.data_dir, client, now=now, on_done=lambda outcome: bar.update(1))
        summary = run.run(items, works, fetched)
    quiet = summary.stop_kind == "interrupted" or (summary.stopped and summary.requests.answered == 0)
    if not quiet:  # else the error line says it all
        console.print(summary_table(summary))
        extra = problems_table(summary)
        if extra is not None:
            console.print(extra)
    if summary.stop_kind == "interrupted":
        kept = summary.count("updated") + summary.count("unchanged")
        log.error(
            "interrupted (Ctrl-C): %d record(s) stored or confirmed, %d work(s) not fetched",
            kept,
            summary.count("not-fetched"),
        )
        return EXIT_INTERRUPTED
    if summary.stop_kind is not None:
        return _EXIT_FOR_STOP[summary.stop_kind]
    return EXIT_OK if summary.ok else EXIT_FAILED


def print_plan(console: Console, items: Sequence) -> None:
    table = Table(title="Dry run: what a refresh would do", show_header=True, header_style="bold")
    table.add_column("slug")
    table.add_column("plan", overflow="fold")
    for item in items:
        table.add_row(item.work.slug, item.describe())
    console.print(table)
    known = sum(item.openalex_id is not None for item in items)
    unknown = len(items) - known
    batches = -(-known // 100)
    console.print(
        f"{len(items)} works: {known} with a known id in {batches} list request(s) of up to 100 ids; "
        f"{unknown} to resolve (free singleton lookups by DOI/arXiv DOI, then a title search each)."
    )


if __name__ == "__main__":
    sys.exit(main())
