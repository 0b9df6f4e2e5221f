"""Taxonomy pages, the sortable catalog table, the errata list and the home page fragments."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

from catalog import TaxonomyNode, Work
from scripts.sitegen.context import (
    BIB,
    CATALOG,
    ERRATA,
    HOME,
    JSON_EXPORT,
    ROUTERS_INDEX,
    SiteContext,
    family_doc,
    node_doc,
    work_doc,
)
from scripts.sitegen.svg import year_chart
from scripts.sitegen.text import h, href, md, rel


def _s(n: int) -> str:
    return "s" if n != 1 else ""


def _cites(ctx: SiteContext, slug: str) -> str:
    c = ctx.citations(slug)
    return f"{c:,}" if c is not None else "—"


def _code_cell(ctx: SiteContext, from_doc: str, work: Work) -> str:
    links = [f"[code]({work.code})"] if work.code else []
    links += [f"[`{f}`]({rel(from_doc, family_doc(f))})" for f in ctx.families_of(work)]
    return " ".join(links)


def works_table(ctx: SiteContext, from_doc: str, works: list[Work]) -> list[str]:
    rows = [
        '<div class="atlas-works" markdown="1">',
        "",
        "| Year | Name | Title | Venue | Citations | Code |",
        "|---:|---|---|---|---:|---|",
    ]
    for w in sorted(works, key=lambda w: w.sort_key):
        venue = w.venue or ("model release" if w.kind == "model-release" else "")
        rows.append(
            f"| {w.year} | {md(w.short_name or '')} | [{md(w.title)}]({rel(from_doc, work_doc(w.slug))}) "
            f"| {md(venue)} | {_cites(ctx, w.slug)} | {_code_cell(ctx, from_doc, w)} |"
        )
    return [*rows, "", "</div>"]


def _tree_lines(ctx: SiteContext, from_doc: str, node_id: str, depth: int = 0) -> list[str]:
    out = []
    for child in ctx.cat.taxonomy.children(node_id):
        ext = ' <span class="atlas-badge">extension</span>' if child.extension else ""
        n = ctx.subtree_count[child.id]
        out.append(
            f"{'    ' * depth}- [{md(child.title)}]({rel(from_doc, node_doc(child))}) — "
            f"{n} work{'s' if n != 1 else ''}{ext}"
        )
        out += _tree_lines(ctx, from_doc, child.id, depth + 1)
    return out


def node_page(ctx: SiteContext, node: TaxonomyNode) -> str:
    doc = node_doc(node)
    tax = ctx.cat.taxonomy
    # the breadcrumb above the title is Material's (navigation.path); the page adds none of its own
    out = [f"# {md(node.title)}", ""]
    if node.extension:
        out += [
            '!!! info "Extension node"',
            "",
            "    MoE Atlas adds this node; the survey's taxonomy has no node where these works fit.",
            f"    Why: {md(node.extension_reason or '')}",
            "",
        ]
    if node.description:
        out += [md(node.description), ""]
    children = tax.children(node.id)
    if children:
        title = "The taxonomy" if node.parent is None else "Sub-topics"
        out += [f"## {title}", "", *_tree_lines(ctx, doc, node.id), ""]
    works = ctx.cat.works_under(node.id)
    n_sub = ctx.subtree_count[node.id]
    if works:
        out += [f"## Works ({len(works)})", ""]
        if children and n_sub > len(works):
            out += [f"Placed directly on this node; {n_sub} works sit on it or below it.", ""]
        out += [*works_table(ctx, doc, works), ""]
    elif not children:
        out += ["No works are placed on this node yet.", ""]
    return "\n".join(out)


def catalog_page(ctx: SiteContext) -> str:
    doc = CATALOG
    branches = ctx.top_branches()
    tax = ctx.cat.taxonomy
    out = [
        "---",
        "search:",
        "  exclude: true",
        "hide:",
        "  - navigation",
        "  - toc",
        "---",
        "",
        "# Catalog",
        "",
        f"Every work in MoE Atlas ({len(ctx.cat.works)}). Click a column heading to sort, type to "
        f"filter. Downloads: [BibTeX of the whole catalog]({rel(doc, BIB)}) · "
        f"[JSON export]({rel(doc, JSON_EXPORT)}).",
        "",
        '<div class="atlas-table-tools">',
        '<input type="search" id="atlas-filter" aria-label="Filter the catalog"'
        ' placeholder="Filter: title, author, venue, year, node, arXiv id">',
        '<select id="atlas-branch" aria-label="Branch">',
        '<option value="">All branches</option>',
    ]
    out += [f'<option value="{h(b)}">{h(tax[b].title)}</option>' for b in branches]
    out += [
        "</select>",
        '<span id="atlas-count" aria-live="polite"></span>',
        "</div>",
        "",
        '<table class="atlas-table" id="atlas-catalog">',
        "<thead><tr>"
        '<th data-type="number" aria-sort="ascending">Year</th>'
        '<th data-type="text">Name</th>'
        '<th data-type="text">Title</th>'
        '<th data-type="text">Authors</th>'
        '<th data-type="text">Venue</th>'
        '<th data-type="number">Citations</th>'
        '<th data-type="text">Taxonomy</th>'
        '<th data-type="text">Code</th>'
        "</tr></thead>",
        "<tbody>",
    ]
    for i, w in enumerate(ctx.cat.works):
        venue = w.venue or ("model release" if w.kind == "model-release" else "")
        cites = ctx.citations(w.slug)
        # works without a count sort after every counted work, in either direction
        cites_cell = (
            f'<td data-label="Citations" data-value="{cites}">{cites:,}</td>'
            if cites is not None
            else '<td data-label="Citations" data-missing="1">—</td>'
        )
        nodes = ", ".join(tax[n].title for n in w.placements)
        shown = ", ".join(w.authors[:3]) + (f" and {len(w.authors) - 3} more" if len(w.authors) > 3 else "")
        code = []
        if w.code:
            code.append(f'<a href="{h(w.code)}" title="official code">code</a>')
        code += [
            f'<a href="{h(href(doc, family_doc(f)))}" title="MoE Atlas router">{h(f)}</a>'
            for f in ctx.families_of(w)
        ]
        extra = " ".join(filter(None, [w.slug, w.ids.arxiv or "", w.ids.doi or "", *w.authors]))
        branch_ids = " ".join(b.id for b in ctx.branches(w))
        out.append(
            f'<tr data-branches="{h(branch_ids)}" data-extra="{h(extra)}">'
            f'<td data-label="Year" data-value="{w.year}.{i:05d}">{w.year}</td>'
            f'<td data-label="Name">{h(w.short_name or "")}</td>'
            f'<td data-label="Title"><a href="{h(href(doc, work_doc(w.slug)))}">{h(w.title)}</a></td>'
            f'<td data-label="Authors">{h(shown)}</td>'
            f'<td data-label="Venue">{h(venue)}</td>'
            f"{cites_cell}"
            f'<td data-label="Taxonomy">{h(nodes)}</td>'
            f'<td data-label="Code">{" ".join(code)}</td></tr>'
        )
    out += ["</tbody>", "</table>", ""]
    return "\n".join(out)


def errata_page(ctx: SiteContext) -> str:
    doc = ERRATA
    with_errata = [w for w in ctx.cat.works if w.errata]
    total = sum(len(w.errata) for w in with_errata)
    out = [
        "# Errata",
        "",
        "Where the survey's reference list or taxonomy is wrong, the catalog records the correction "
        f"and why. {total} correction{'s' if total != 1 else ''} on {len(with_errata)} "
        f"work{'s' if len(with_errata) != 1 else ''}.",
        "",
    ]
    if not with_errata:
        out += ["No corrections recorded yet.", ""]
    for w in with_errata:
        ref = f" — survey reference [{w.survey_ref}]" if w.survey_ref else ""
        out += [
            f"## {md(w.short_name or w.title)}",
            "",
            f"[{md(w.title)}]({rel(doc, work_doc(w.slug))}){ref}",
            "",
        ]
        out += ['<div class="atlas-errata" markdown="1">', ""]
        out += ["| Field | The survey says | MoE Atlas records | Why |", "|---|---|---|---|"]
        for e in w.errata:
            out.append(f"| {e.field} | {md(e.survey_says)} | {md(e.corrected)} | {md(e.reason)} |")
        out += ["", "</div>", ""]
    return "\n".join(out)


def home_counts(ctx: SiteContext, today: dt.date | None = None) -> str:
    cat = ctx.cat
    works = cat.works
    numbered = sum(1 for w in works if w.survey_ref is not None)
    in_survey = sum(1 for w in works if w.provenance in ("survey", "survey-unnumbered"))
    ext = sum(1 for n in cat.taxonomy if n.extension)
    n_routers = sum(len(f.routers) for f in ctx.families)
    n_presets = sum(len(f.presets) for f in ctx.families)
    fetched = [r for r in (cat.fetched_for(w.slug) for w in works) if r is not None]
    if fetched:
        newest = max(r.fetched_at for r in fetched).date()
        oldest = min(r.fetched_at for r in fetched).date()
        fresh = f"newest fetch {newest.isoformat()}, oldest {oldest.isoformat()}"
        if today is not None:
            fresh += f" ({(today - oldest).days} days ago)"
    else:
        fresh = "nothing fetched yet: run the refresh"
    root_doc = node_doc(cat.taxonomy.root)
    cards = [
        (
            f"{len(works)} works",
            f"{in_survey} from the survey ({numbered} numbered), {len(works) - in_survey} beyond it. "
            f"[Browse the catalog]({rel(HOME, CATALOG)})",
        ),
        (
            f"{len(cat.taxonomy)} taxonomy nodes",
            f"{len(cat.taxonomy) - ext} from the survey, {ext} extension{_s(ext)}. "
            f"[Open the taxonomy]({rel(HOME, root_doc)})",
        ),
        (
            f"{n_routers} router{_s(n_routers)}",
            f"{len(ctx.families)} famil{'ies' if len(ctx.families) != 1 else 'y'}, {n_presets} paper "
            f"preset{_s(n_presets)}, {len(ctx.tested_routers)} named by the test suite. "
            f"[See the routers]({rel(HOME, ROUTERS_INDEX)})",
        ),
        (f"{len(fetched)} of {len(works)} records fetched", f"From OpenAlex; {fresh}."),
    ]
    items = [f"-   **{title}**\n\n    ---\n\n    {text}" for title, text in cards]
    return '<div class="grid cards" markdown>\n\n' + "\n\n".join(items) + "\n\n</div>\n"


def home_chart(ctx: SiteContext) -> str:
    tax = ctx.cat.taxonomy
    series: dict[str, dict[int, int]] = {b: defaultdict(int) for b in ctx.top_branches()}
    for w in ctx.cat.works:
        for b in ctx.branches(w):
            series[b.id][w.year] += 1
    labels = {b: tax[b].title for b in series}
    note = "A work placed under several branches counts once in each. Hover a bar for its count."
    return year_chart({k: dict(v) for k, v in series.items()}, labels) + f"\n\n{note}\n"


def taxonomy_nav(ctx: SiteContext, node_id: str) -> dict:
    node = ctx.cat.taxonomy[node_id]
    children = ctx.cat.taxonomy.children(node_id)
    title = h(node.title)
    if not children:
        return {title: node_doc(node)}
    return {title: [node_doc(node), *(taxonomy_nav(ctx, c.id) for c in children)]}
