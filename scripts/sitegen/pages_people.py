"""Pages about people and time: the authors index, "What's new", the Atom feed, the tracking report."""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from pathlib import Path

from catalog import Work
from scripts.sitegen.context import (
    AUTHORS,
    CATALOG,
    FEED,
    TRACKING,
    WHATS_NEW,
    SiteContext,
    author_anchor,
    author_sort_key,
    work_doc,
)
from scripts.sitegen.pages_works import work_link
from scripts.sitegen.text import md, page_url, plain, rel

WHATS_NEW_LIMIT = 50
FEED_LIMIT = 100
TRACKING_REPORT = "tracking.json"
"""Name of the tracking report under the data directory (``scripts/track.py --out``)."""


def _entered(ctx: SiteContext) -> list[Work]:
    """Works with a known entry date, newest first (slug order within a day, stable)."""
    dated = [w for w in ctx.cat.works if w.added is not None]
    return sorted(dated, key=lambda w: (w.added, w.slug), reverse=True)


def authors_page(ctx: SiteContext) -> str:
    by_author: dict[str, list[Work]] = defaultdict(list)
    for w in ctx.cat.works:
        for a in w.authors:
            by_author[a].append(w)
    names = sorted(by_author, key=author_sort_key)
    missing = [w for w in ctx.cat.works if not w.authors]
    out = [
        "# Authors",
        "",
        f"Every author of the {len(ctx.cat.works)} works in the catalog, {len(names)} in all, by family "
        "name, with their works. Names are as printed on each paper; organisations stand for model "
        "releases without a paper. Search finds works by author name too.",
        "",
    ]
    letter = None
    for name in names:
        initial = author_sort_key(name)[0][:1].upper() or "#"
        if initial != letter:
            letter = initial
            out += [f"## {md(letter)}", ""]
        works = sorted(by_author[name], key=lambda w: w.sort_key)
        links = "; ".join(work_link(ctx, AUTHORS, w.slug) for w in works)
        out += [
            f'<div class="atlas-author" id="{author_anchor(name)}" markdown="1">',
            f"**{md(name)}**: {links}",
            "</div>",
            "",
        ]
    if missing:
        out += ["## Works whose authors are not verified", ""]
        out += [f"- {work_link(ctx, AUTHORS, w.slug)}" for w in missing] + [""]
    return "\n".join(out)


def whats_new_page(ctx: SiteContext) -> str:
    works = _entered(ctx)
    out = [
        "# What's new",
        "",
        "Works as they entered the catalog, newest first (the date is when the work's file was added "
        f"and never changes). Follow it as an [Atom feed]({rel(WHATS_NEW, FEED)}).",
        "",
    ]
    day = None
    for w in works[:WHATS_NEW_LIMIT]:
        if w.added != day:
            day = w.added
            out += [f"## {day.isoformat()}", ""]
        authors = ", ".join(w.authors[:3]) + (" et al." if len(w.authors) > 3 else "")
        venue = w.venue or ("model release" if w.kind == "model-release" else "")
        line = f"- {work_link(ctx, WHATS_NEW, w.slug)} — {md(authors)}"
        out.append(line + (f" · {md(venue)}" if venue else ""))
    if len(works) > WHATS_NEW_LIMIT:
        more = len(works) - WHATS_NEW_LIMIT
        out += ["", f"The {more} earlier works are in the [catalog]({rel(WHATS_NEW, CATALOG)})."]
    return "\n".join([*out, ""])


def atom_feed(ctx: SiteContext, site_url: str) -> str:
    """Atom 1.0 feed of works as they entered the catalog (feedgen); entry dates are stable."""
    from feedgen.feed import FeedGenerator

    base = site_url if site_url.endswith("/") else site_url + "/"
    works = _entered(ctx)[:FEED_LIMIT]
    fg = FeedGenerator()
    fg.id(base + page_url(WHATS_NEW))
    fg.title("MoE Atlas: works entering the catalog")
    fg.subtitle("Mixture-of-Experts papers as they are added to MoE Atlas")
    fg.link(href=base + page_url(WHATS_NEW), rel="alternate")
    fg.link(href=base + FEED, rel="self")
    fg.language("en")
    newest = works[0].added if works else dt.date(2026, 1, 1)
    fg.updated(dt.datetime.combine(newest, dt.time(), tzinfo=dt.timezone.utc))
    for w in reversed(works):  # feedgen lists the last added entry first
        when = dt.datetime.combine(w.added, dt.time(), tzinfo=dt.timezone.utc)
        entry = fg.add_entry()
        url = base + page_url(work_doc(w.slug))
        entry.id(url)
        entry.title(plain(w.title))
        entry.link(href=url)
        entry.published(when)
        entry.updated(when)
        for a in w.authors:
            entry.author(name=plain(a))
        summary = ", ".join(p for p in (w.venue, f"placed under {', '.join(w.placements)}") if p)
        entry.summary(plain(summary))
    return fg.atom_str(pretty=True).decode("utf-8")


def read_tracking(data_dir: Path) -> dict | None:
    """The JSON report of ``scripts/track.py --out <data>/tracking.json``, when there is one."""
    path = Path(data_dir) / TRACKING_REPORT
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def tracking_page(ctx: SiteContext, report: dict) -> str:
    out = [
        "# Tracking: new works citing the catalog",
        "",
        f"Works published since {md(report['since'])} that cite catalog works and are not in the catalog "
        f"yet, ranked by how many catalog works they cite ({report['citing_works_seen']} citing works seen "
        f"for {report['tracked_works']} tracked works). Candidates to review, not part of the catalog; "
        "`scripts/track.py --draft OPENALEX_ID` starts a curated file for one.",
        "",
        "| Cites | Published | Title | OpenAlex |",
        "|---|---|---|---|",
    ]
    for c in report["candidates"]:
        cites = ", ".join(work_link(ctx, TRACKING, s) for s in sorted(c.get("cites", [])))
        oa = c.get("openalex_id") or ""
        out.append(
            f"| {cites} | {md(c.get('publication_date') or '')} | {md(c.get('title') or '')} "
            f"| [{md(oa)}](https://openalex.org/{oa}) |"
        )
    return "\n".join([*out, ""])
