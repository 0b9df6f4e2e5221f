"""Write every generated page, download and home-page fragment, and return the navigation.

``generate()`` needs no MkDocs: it turns a ``catalog.Catalog`` (and the router families,
if any) into Markdown files under ``<docs>/generated/`` and a ``nav`` list for the MkDocs config.
Output is deterministic for a given catalog (router timings aside).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from catalog import Catalog
from catalog.export import export_catalog
from scripts.sitegen.bibtex import bibliography, bibtex_entry
from scripts.sitegen.context import (
    AUTHORS,
    BIB,
    CATALOG,
    ERRATA,
    FEED,
    GEN,
    HOME,
    JSON_EXPORT,
    PARTIALS,
    ROUTERS_INDEX,
    ROUTERS_INTEROP,
    ROUTERS_PARALLEL,
    TRACKING,
    WHATS_NEW,
    SiteContext,
    family_doc,
    node_doc,
    work_doc,
)
from scripts.sitegen.pages_arena import ARENA, arena_page
from scripts.sitegen.pages_catalog import (
    catalog_page,
    errata_page,
    home_chart,
    home_counts,
    node_page,
    taxonomy_nav,
)
from scripts.sitegen.pages_parallel import parallel_page
from scripts.sitegen.pages_people import atom_feed, authors_page, read_tracking, tracking_page, whats_new_page
from scripts.sitegen.pages_routers import family_page, interop_page, routers_index, routers_nav
from scripts.sitegen.pages_works import work_page
from scripts.sitegen.routers import MeasureSetup, RouterFamily

log = logging.getLogger(__name__)
MARKER = ".sitegen"


@dataclass(frozen=True)
class GeneratedSite:
    out_dir: Path
    files: list[str] = field(default_factory=list)
    """Docs-relative paths of every file written, in writing order."""
    nav: list[Any] = field(default_factory=list)
    """The ``nav`` for the MkDocs config."""


def _newest_fetch(cat: Catalog) -> dt.datetime:
    """The newest fetch time in the catalog (a fixed epoch when nothing was fetched)."""
    times = [r.fetched_at for r in cat.fetched.values()]
    return max(times) if times else dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _claim(out: Path) -> None:
    """Make sure the output folder is the generator's, refusing a non-empty folder it did not write."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise FileExistsError(f"{out} is not empty and was not written by the site generator; not using it")
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER
    if not marker.exists():
        marker.write_text("Written by scripts/sitegen; every file here is regenerated on each build.\n")


def _prune(out: Path, keep: set[Path]) -> None:
    """Remove files (and then empty folders) of an earlier run that this run did not write."""
    for path in sorted(out.rglob("*"), reverse=True):
        if path.is_file() and path not in keep and path.name != MARKER:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def generate(
    cat: Catalog,
    docs_dir: Path,
    families: list[RouterFamily] | None = None,
    tested_routers: set[str] | None = None,
    setup: MeasureSetup | None = None,
    now: dt.datetime | None = None,
    progress: bool = False,
    site_url: str = "http://127.0.0.1:8000/",
    arena: list[dict[str, Any]] | None = None,
) -> GeneratedSite:
    """Write the generated part of the site into ``docs_dir/generated``; return files and nav.

    ``now`` stamps the JSON export and dates the freshness note on the home page; leave it out
    for output that depends on the catalog alone. ``site_url`` makes the Atom feed's links
    absolute. A file whose content is unchanged is not rewritten and files of an earlier run that
    this one does not write are removed, so ``mkdocs serve`` (which watches the docs folder) sees
    only real changes and does not rebuild in a loop.
    """
    docs_dir = Path(docs_dir)
    ctx = SiteContext.build(cat, list(families or []), set(tested_routers or ()))
    ctx.arena = list(arena or [])
    setup = setup or MeasureSetup()
    _claim(docs_dir / GEN)
    written: list[str] = []
    folders: set[Path] = set()

    def write(rel_path: str, text: str) -> None:
        path = docs_dir / rel_path
        if path.parent not in folders:
            path.parent.mkdir(parents=True, exist_ok=True)
            folders.add(path.parent)
        data = (text if text.endswith("\n") else text + "\n").encode("utf-8")
        if not path.is_file() or path.read_bytes() != data:
            path.write_bytes(data)
        written.append(rel_path)

    write(f"{PARTIALS}/home-counts.md", home_counts(ctx, now.date() if now else None))
    write(f"{PARTIALS}/home-chart.md", home_chart(ctx))
    for node in cat.taxonomy:
        write(node_doc(node), node_page(ctx, node))
    works = tqdm(cat.works, desc="work pages", unit="page", disable=not progress, leave=False)
    entries = []
    for w in works:
        write(work_doc(w.slug), work_page(ctx, w))
        entries.append(bibtex_entry(w, cat.fetched_for(w.slug)))
    write(CATALOG, catalog_page(ctx))
    write(ERRATA, errata_page(ctx))
    write(BIB, bibliography(entries))
    stamp = now or _newest_fetch(cat)
    write(
        JSON_EXPORT,
        json.dumps(export_catalog(cat, generated_at=stamp), ensure_ascii=False, separators=(",", ":")),
    )
    write(ROUTERS_INDEX, routers_index(ctx))
    write(ROUTERS_INTEROP, interop_page(ctx))
    write(ROUTERS_PARALLEL, parallel_page(ctx))
    write(ARENA, arena_page(ctx, ctx.arena))
    for fam in ctx.families:
        write(family_doc(fam.name), family_page(ctx, fam, setup))
    write(AUTHORS, authors_page(ctx))
    write(WHATS_NEW, whats_new_page(ctx))
    write(FEED, atom_feed(ctx, site_url))
    report = read_tracking(cat.data_dir)
    if report is not None:
        write(TRACKING, tracking_page(ctx, report))
    _prune(docs_dir / GEN, {docs_dir / f for f in written})

    (root_entry,) = taxonomy_nav(ctx, cat.taxonomy.root.id).values()
    nav = [
        {"Home": HOME},
        {"Taxonomy": root_entry if isinstance(root_entry, list) else [root_entry]},
        {"Catalog": [CATALOG, {"Authors": AUTHORS}, {"What's new": WHATS_NEW}]},
        {
            "Routers": [
                ROUTERS_INDEX,
                {"In transformers and torch.compile": ROUTERS_INTEROP},
                {"Expert parallelism": ROUTERS_PARALLEL},
                *routers_nav(ctx),
            ]
        },
        {"Arena": ARENA},
        {"Errata": ERRATA},
    ]
    if report is not None:
        nav[2]["Catalog"].append({"Tracking": TRACKING})
    log.info("generated %d files under %s", len(written), docs_dir / GEN)
    return GeneratedSite(docs_dir / GEN, written, nav)
