"""Data-quality report: where a work's curated facts and its fetched OpenAlex record disagree.

Curated facts (authors, venue, year) are what the site shows; OpenAlex adds citations and
references. A disagreement is not an error (OpenAlex merges preprints into published versions,
spells names its own way, files conference papers under their proceedings' series), but a person
should look at it. ``scripts/validate.py`` prints the report after its checks.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from catalog.models import FetchedRecord, Work
from catalog.types import CONFERENCES, JOURNALS, parse_venue


@dataclass(frozen=True)
class Disagreement:
    slug: str
    fact: str
    curated: str
    fetched: str

    def __str__(self) -> str:
        return f"{self.slug} [{self.fact}]: curated {self.curated!r}, OpenAlex {self.fetched!r}"


def _folded(name: str) -> str:
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().casefold()
    return " ".join(re.sub(r"[^a-z ]+", " ", text).split())


def _family(name: str) -> str:
    words = _folded(name).split()
    return words[-1] if words else ""


def compare(work: Work, record: FetchedRecord) -> list[Disagreement]:
    """Disagreements between one work's curated facts and its fetched record."""
    out: list[Disagreement] = []
    if work.authors and record.authors and work.kind != "model-release":
        ours = [_family(a) for a in work.authors]
        theirs = [_family(a.name) for a in record.authors]
        if ours != theirs:
            out.append(
                Disagreement(
                    work.slug,
                    "authors",
                    f"{len(work.authors)}: {', '.join(work.authors)}",
                    f"{len(record.authors)}: {', '.join(a.name for a in record.authors)}",
                )
            )
    venue = parse_venue(work.venue) if work.venue else None
    years = {work.year} | ({venue[1]} if venue else set())
    if record.publication_year is not None and record.publication_year not in years:
        shown = ", ".join(str(y) for y in sorted(years))
        out.append(Disagreement(work.slug, "year", shown, str(record.publication_year)))
    if venue is not None and record.venue:
        name = venue[0]
        long = (JOURNALS | CONFERENCES)[name]
        seen = _folded(record.venue)
        if _folded(name) not in seen and _folded(long) not in seen:
            out.append(Disagreement(work.slug, "venue", work.venue or "", record.venue))
    return out


def report(works: list[Work], fetched: dict[str, FetchedRecord]) -> list[Disagreement]:
    """Every disagreement, by slug."""
    out: list[Disagreement] = []
    for w in works:
        rec = fetched.get(w.slug)
        if rec is not None:
            out += compare(w, rec)
    return out
