"""One page per catalog work: metadata, citations, placements, errata, links, BibTeX, code."""

from __future__ import annotations

import posixpath

from catalog import Work
from scripts.sitegen.bibtex import bibtex_entry
from scripts.sitegen.context import (
    AUTHORS,
    ERRATA,
    ROUTERS_PARALLEL,
    SiteContext,
    author_anchor,
    family_doc,
    node_doc,
    work_doc,
)
from scripts.sitegen.svg import sparkline
from scripts.sitegen.text import code, excerpt, fence, h, href, md, rel

ABSTRACT_CHARS = 300


def external_links(work: Work, doi: str | None) -> list[tuple[str, str]]:
    """``(label, url)`` for every identifier the work has."""
    links = []
    if work.ids.arxiv:
        links.append((f"arXiv:{work.ids.arxiv}", f"https://arxiv.org/abs/{work.ids.arxiv}"))
    if doi:
        links.append((f"DOI {doi}", f"https://doi.org/{doi}"))
    oa = work.ids.openalex
    if oa:
        links.append((f"OpenAlex {oa}", f"https://openalex.org/{oa}"))
    if work.ids.url and not any(str(work.ids.url).rstrip("/") == u.rstrip("/") for _, u in links):
        links.append(("Link", str(work.ids.url)))
    return links


def work_link(ctx: SiteContext, from_doc: str, slug: str) -> str:
    """Markdown link to a work page, or plain text for a slug the catalog does not hold."""
    if slug in ctx.cat:
        w = ctx.cat.work(slug)
        return f"[{md(w.title)}]({rel(from_doc, work_doc(slug))}) ({w.year})"
    return f"`{slug}` (not in the catalog)"


def crumbs(ctx: SiteContext, from_doc: str, node_id: str, link_last: bool = True) -> str:
    """``Root › Branch › … › Node`` with links, relative to ``from_doc`` (cached per folder)."""
    key = (posixpath.dirname(from_doc), node_id, link_last)
    if key not in ctx.crumbs_cache:
        ctx.crumbs_cache[key] = _crumbs(ctx, from_doc, node_id, link_last)
    return ctx.crumbs_cache[key]


def _crumbs(ctx: SiteContext, from_doc: str, node_id: str, link_last: bool) -> str:
    path = ctx.cat.taxonomy.path(node_id)
    parts = []
    for i, n in enumerate(path):
        if i == len(path) - 1 and not link_last:
            parts.append(f"**{md(n.title)}**")
        else:
            parts.append(f"[{md(n.title)}]({rel(from_doc, node_doc(n))})")
    return " › ".join(parts)


def _missing(work: Work, fact: str, default: str) -> str:
    why = work.unverified.get(fact)  # type: ignore[call-overload]
    text = f"not verified: {why}" if why else default
    return f'<span class="atlas-missing">{h(text)}</span>'


def _venue_text(work: Work) -> str:
    if work.kind == "model-release":
        return "model release (no paper)"
    survey = f' <span class="atlas-aside">(the survey says {h(work.survey_venue)})</span>'
    if work.venue is None:
        return _missing(work, "venue", "not verified") + (survey if work.survey_venue else "")
    text = h(work.venue)
    if work.venue == "arXiv":
        text += " (no peer-reviewed version known)"
    if work.survey_venue and work.survey_venue != work.venue:
        text += survey
    return text


def _meta_rows(ctx: SiteContext, work: Work) -> list[tuple[str, str]]:
    """Label and HTML value of each metadata row."""
    rec = ctx.rec(work.slug)
    rows: list[tuple[str, str]] = []
    label = "Organisation" if work.kind == "model-release" else "Authors"
    if work.authors:
        to_index = href(work_doc(work.slug), AUTHORS)
        links = [f'<a href="{h(to_index)}#{author_anchor(a)}">{h(a)}</a>' for a in work.authors]
        rows.append((label, ", ".join(links)))
    else:
        rows.append((label, _missing(work, "authors", "not verified")))
    rows.append(("Venue", _venue_text(work)))
    when = str(work.year)
    if work.date:
        when += f" (first released {h(work.date)})"
    if rec is not None and rec.publication_date:
        when += f", published {rec.publication_date.isoformat()} (OpenAlex)"
    rows.append(("Year", when))
    if work.code:
        rows.append(("Code", f'<a href="{h(work.code)}">{h(str(work.code).removeprefix("https://"))}</a>'))
    else:
        rows.append(("Code", _missing(work, "code", "no official code known")))
    if work.pdf:
        rows.append(("PDF", f'<a href="{h(work.pdf)}">{h(str(work.pdf).removeprefix("https://"))}</a>'))
    else:
        rows.append(("PDF", _missing(work, "pdf", "no public PDF known")))
    doi = work.ids.doi or (rec.doi if rec is not None else None)
    links = external_links(work, doi)
    if links:
        rows.append(("Identifiers", " · ".join(f'<a href="{h(u)}">{h(label)}</a>' for label, u in links)))
    if work.survey_ref is not None:
        rows.append(("Survey", f"reference [{work.survey_ref}] of the survey"))
    else:
        rows.append(
            (
                "Survey",
                {
                    "survey-unnumbered": "listed by the survey without a reference number",
                    "seed": "beyond the survey (seed paper)",
                    "tracked": "beyond the survey (found by citation tracking)",
                    "survey": "cited by the survey",
                }[work.provenance],
            )
        )
    if rec is not None:
        trend = [(yc.year, yc.cited_by_count) for yc in rec.counts_by_year]
        rows.append(("Citations", f"{rec.cited_by_count:,} (OpenAlex) {sparkline(trend)}"))
        fetched = f"fetched from OpenAlex on {rec.fetched_at.date().isoformat()}"
        if rec.updated_date is not None:
            fetched += f"; OpenAlex last changed the record on {rec.updated_date.date().isoformat()}"
        rows.append(("Data", fetched))
        if rec.primary_topic is not None:
            rows.append(
                (
                    "OpenAlex topic",
                    f"{h(rec.primary_topic.name)} "
                    '<span class="atlas-aside">(assigned automatically by OpenAlex, not by MoE Atlas)</span>',
                )
            )
        if rec.is_retracted:
            rows.append(("Status", '<span class="atlas-badge atlas-badge--alert">retracted</span>'))
    else:
        rows.append(
            ("Citations", '<span class="atlas-missing">unknown (not yet fetched from OpenAlex)</span>')
        )
        rows.append(("Data", '<span class="atlas-missing">not yet fetched from OpenAlex</span>'))
    return rows


FACT_LABELS = {
    "title": "Title",
    "authors": "Authors",
    "venue": "Venue",
    "doi": "DOI",
    "arxiv": "arXiv id",
    "code": "Code",
    "pdf": "PDF",
    "date": "Date",
}


def _sources(work: Work) -> list[str]:
    """Where each curated fact was read, what to know about it, and why any is missing."""
    if not (work.sources or work.caveats or work.unverified):
        return []
    out = ["## Sources", "", "Each fact above was read from a public page:", ""]
    for fact, url in work.sources.items():
        out.append(f"- {FACT_LABELS[fact]}: [{md(str(url))}]({url})")
    for fact, why in work.caveats.items():
        out.append(f"- {FACT_LABELS[fact]}, note: {md(why)}")
    for fact, why in work.unverified.items():
        out.append(f"- {FACT_LABELS[fact]}: not verified — {md(why)}")
    return [*out, ""]


def work_page(ctx: SiteContext, work: Work) -> str:
    doc = work_doc(work.slug)
    rec = ctx.rec(work.slug)
    out = ["---", "hide:", "  - navigation", "---", "", f"# {md(work.title)}", ""]
    if work.short_name and work.short_name != work.title:
        out += [f'<p class="atlas-subtitle">{h(work.short_name)}</p>', ""]
    out.append('<dl class="atlas-meta">')
    for label, value in _meta_rows(ctx, work):
        out.append(f"<dt>{label}</dt>\n<dd>{value}</dd>")  # white space keeps search previews readable
    out += ["</dl>", ""]

    if rec is not None and rec.abstract:
        out += ["## Abstract (excerpt)", "", f"> {md(excerpt(rec.abstract, ABSTRACT_CHARS))}", ""]
        out += ["Only an excerpt is shown; follow the identifiers above for the full text.", ""]
    if work.notes:
        out += ["## Notes", "", md(work.notes), ""]
    out += _sources(work)
    if work.tags:
        out += ["Tags: " + ", ".join(f"`{t}`" for t in work.tags), ""]

    out += ["## Place in the taxonomy", ""]
    for nid in work.placements:
        ext = " *(extension node)*" if ctx.cat.taxonomy[nid].extension else ""
        out.append(f"- {crumbs(ctx, doc, nid)}{ext}")
    out.append("")

    out += ["## Reference implementation", ""]
    fams = ctx.families_of(work)
    policies = [p for p in work.implementations if p in ctx.impl_policy]
    if fams or policies:
        for name in fams:
            fam = ctx.family(name)
            routers = ", ".join(f"`{r.name}`" for r in fam.routers)
            presets = [p.name for p in fam.presets if work.slug in p.papers]
            line = f"- [{md(fam.title)}]({rel(doc, family_doc(name))}) — routers {routers}"
            if presets:
                line += "; presets " + ", ".join(f"`{p}`" for p in presets)
            out.append(line)
        for p in policies:
            name = ctx.impl_policy[p]
            target = f"{rel(doc, ROUTERS_PARALLEL)}#policy-{name}"
            out.append(
                f"- [Expert parallelism]({target}) — dispatch policy {code(name)} ({code(p)}), "
                "tested on several processes and in the simulator"
            )
        unresolved = [
            p for p in work.implementations if p not in ctx.impl_family and p not in ctx.impl_policy
        ]
        for p in unresolved:
            out.append(f"- `{p}` (no router page)")
        out.append("")
    elif work.implementations:
        out += ["The catalog names these implementations, but no router page documents them yet:", ""]
        out += [f"- `{p}`" for p in work.implementations] + [""]
    else:
        out += ["No reference implementation yet.", ""]

    if work.errata:
        out += [
            "## Errata",
            "",
            f"Corrections to the survey's entry (all of them: [Errata]({rel(doc, ERRATA)})).",
            "",
        ]
        for e in work.errata:
            out += [
                f'!!! warning "Erratum: {e.field}"',
                "",
                f"    The survey says: {md(e.survey_says)}",
                "",
                f"    MoE Atlas records: {md(e.corrected)}",
                "",
                f"    Why: {md(e.reason)}",
                "",
            ]

    out += ["## Within the catalog", ""]
    if rec is None:
        out += ["References: not known yet (the work has not been fetched from OpenAlex).", ""]
    elif not rec.referenced_works:
        out += ["References: not known yet (OpenAlex lists no references for this work).", ""]
    elif rec.referenced_in_catalog:
        out += (
            ["This work cites:", ""]
            + [f"- {work_link(ctx, doc, s)}" for s in rec.referenced_in_catalog]
            + [""]
        )
    else:
        out += ["This work cites no other catalog work.", ""]
    citing = ctx.cited_by.get(work.slug, [])
    if citing:
        out += ["Cited by:", ""] + [f"- {work_link(ctx, doc, s)}" for s in citing] + [""]
    else:
        out += ["No fetched catalog work cites it.", ""]

    out += ["## BibTeX", "", fence(bibtex_entry(work, rec), "bibtex"), ""]
    return "\n".join(out)
