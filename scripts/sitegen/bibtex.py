"""BibTeX entries for catalog works, keyed by the work's slug.

Everything comes from the curated facts: authors, the published venue (``@article`` with
``journal`` for a journal, ``@inproceedings`` with ``booktitle`` for a conference or workshop,
``@misc`` with ``eprint`` for an arXiv-only work or a model release), the venue's year, DOI, arXiv
id and URL. A fetched OpenAlex record only fills a DOI the curated file lacks. Field values are
LaTeX-escaped; titles are double-braced so BibTeX styles keep their capitalisation, and an
organisation as author is braced so that styles do not split it into first and last names.
"""

from __future__ import annotations

import re

from catalog import FetchedRecord, Work
from catalog.types import CONFERENCES, JOURNALS, parse_venue
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


def latex_escape(text: str) -> str:
    """Escape the characters BibTeX/LaTeX treat specially; collapse whitespace."""
    return _LATEX_RE.sub(lambda m: _LATEX[m.group()], " ".join(plain(text).split()))


def verbatim(text: str) -> str:
    """A URL or DOI as BibTeX styles expect it (typeset verbatim): only braces and backslashes go."""
    return re.sub(r"[{}\\\s]", "", text)


def _author(name: str, work: Work) -> str:
    text = latex_escape(name)
    return "{" + text + "}" if work.kind == "model-release" else text


def bibtex_entry(work: Work, rec: FetchedRecord | None) -> str:
    """One ``@type{slug, ...}`` entry."""
    fields: list[tuple[str, str]] = []
    if work.authors:
        fields.append(("author", " and ".join(_author(a, work) for a in work.authors)))
    fields.append(("title", "{" + latex_escape(work.title) + "}"))
    venue = parse_venue(work.venue) if work.venue else None
    year = venue[1] if venue is not None else work.year
    if venue is None:
        etype = "misc"
        if work.kind == "model-release":
            fields.append(("howpublished", "Model release"))
    else:
        name, _, workshop = venue
        if name in JOURNALS:
            etype = "article"
            fields.append(("journal", latex_escape(JOURNALS[name])))
        else:
            etype = "inproceedings"
            book = CONFERENCES[name] + (" Workshops" if workshop else "")
            fields.append(("booktitle", latex_escape(book)))
    fields.append(("year", str(year)))
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
