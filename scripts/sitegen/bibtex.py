"""BibTeX entries for catalog works, keyed by the work's slug.

Curated data gives the title, year, venue label and identifiers; a fetched OpenAlex record adds
authors, the venue name and the DOI. Field values are LaTeX-escaped; titles are double-braced so
BibTeX styles keep their capitalisation.
"""

from __future__ import annotations

import re

from catalog import FetchedRecord, Work
from scripts.sitegen.text import plain

_LATEX = {
    "\\": r"\textbackslash{}",
    "{": r"\{",
    "}": r"\}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "^": r"\^{}",
    "~": r"\~{}",
}
_LATEX_RE = re.compile("|".join(re.escape(c) for c in _LATEX))
_JOURNAL_RE = re.compile(r"journal|transactions|jmlr|letters|review|magazine", re.IGNORECASE)
_PREPRINT_RE = re.compile(r"^(arxiv|github|techrxiv|openreview)\b", re.IGNORECASE)


def latex_escape(text: str) -> str:
    """Escape the characters BibTeX/LaTeX treat specially; collapse whitespace."""
    return _LATEX_RE.sub(lambda m: _LATEX[m.group()], " ".join(plain(text).split()))


def verbatim(text: str) -> str:
    """A URL or DOI as BibTeX styles expect it (typeset verbatim): only braces and backslashes go."""
    return re.sub(r"[{}\\\s]", "", text)


def _venue(work: Work, rec: FetchedRecord | None) -> str | None:
    if rec is not None and rec.venue:
        return rec.venue
    if work.venue and not _PREPRINT_RE.match(work.venue):
        # The survey writes "ICML 2024"; drop the trailing year, the entry has its own.
        return re.sub(r"\s+\d{4}$", "", work.venue)
    return None


def bibtex_entry(work: Work, rec: FetchedRecord | None) -> str:
    """One ``@type{slug, ...}`` entry."""
    venue = _venue(work, rec)
    fields: list[tuple[str, str]] = [("title", "{" + latex_escape(work.title) + "}")]
    if rec is not None and rec.authors:
        fields.append(("author", " and ".join(latex_escape(a.name) for a in rec.authors)))
    year = rec.publication_year if rec is not None and rec.publication_year else work.year
    fields.append(("year", str(year)))
    if work.kind == "model-release" or venue is None:
        etype = "misc"
        if work.kind == "model-release":
            fields.append(("howpublished", "Model release"))
    elif _JOURNAL_RE.search(venue):
        etype = "article"
        fields.append(("journal", latex_escape(venue)))
    else:
        etype = "inproceedings"
        fields.append(("booktitle", latex_escape(venue)))
    if work.ids.arxiv:
        fields += [("eprint", work.ids.arxiv), ("archiveprefix", "arXiv")]
    doi = work.ids.doi or (rec.doi if rec is not None else None)
    if doi:
        fields.append(("doi", verbatim(doi)))
    if work.ids.url:
        fields.append(("url", verbatim(str(work.ids.url))))
    elif work.ids.arxiv:
        fields.append(("url", f"https://arxiv.org/abs/{work.ids.arxiv}"))
    width = max(len(k) for k, _ in fields)
    body = ",\n".join(f"  {k.ljust(width)} = {{{v}}}" for k, v in fields)
    return f"@{etype}{{{work.slug},\n{body}\n}}"


def bibliography(entries: list[str]) -> str:
    """A whole ``.bib`` file."""
    return "% MoE Atlas catalog; keys are catalog slugs.\n\n" + "\n\n".join(entries) + "\n"
