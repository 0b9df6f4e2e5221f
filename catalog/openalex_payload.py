"""OpenAlex work payloads as the API sends them, and their conversion into stored records.

Payload models mirror the parts of OpenAlex's work object that MoE Atlas keeps. They ignore
every other key (OpenAlex adds fields often) and accept ``null`` wherever OpenAlex sends it for
a missing value. ``to_record()`` turns one payload into a strict ``FetchedRecord``.

Text is kept exactly as OpenAlex sends it: titles and abstracts may carry HTML tags or entities,
and escaping them is the job of whatever renders the text.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, NonNegativeInt, ValidationError

from catalog.models import Author, FetchedRecord, Institution, ResolvedBy, Topic, YearCount
from catalog.types import OpenAlexId

log = logging.getLogger(__name__)

COUNTS_WINDOW_YEARS = 10
"""OpenAlex reports ``counts_by_year`` for the last ten years only."""
MAX_ABSTRACT_CHARS = 10_000
"""Longest abstract stored; a longer one is cut at a word boundary and ends with "…"."""
MAX_TEXT_CHARS = 1_000
"""Longest title, venue, name or topic stored; a longer one is cut and ends with "…"."""

_OPENALEX_WORK_RE = re.compile(r"^(?:https?://openalex\.org/)?([Ww]\d+)$")
_OPENALEX_AUTHOR_RE = re.compile(r"^(?:https?://openalex\.org/)?([Aa]\d+)$")
_DOI_PREFIX_RE = re.compile(r"^(?:https?://(?:dx\.)?doi\.org/|doi:)", re.IGNORECASE)
_DOI_RE = re.compile(r"^10\.\d{4,9}/\S+$")


class PayloadError(ValueError):
    """A payload that cannot become a record; the message names the work and the field."""


def _none_as_empty_list(value: Any) -> Any:
    return [] if value is None else value


def _none_as(default: Any):
    return lambda value: default if value is None else value


class Payload(BaseModel):
    """Base of payload models: unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class Named(Payload):
    display_name: str | None = None


class PayloadLocation(Payload):
    source: Named | None = None
    raw_source_name: str | None = None


class PayloadAuthor(Payload):
    id: str | None = None
    display_name: str | None = None
    orcid: str | None = None


class PayloadInstitution(Payload):
    display_name: str | None = None
    ror: str | None = None
    country_code: str | None = None


class PayloadAuthorship(Payload):
    author: PayloadAuthor | None = None
    raw_author_name: str | None = None
    institutions: Annotated[list[PayloadInstitution], BeforeValidator(_none_as_empty_list)] = []


class PayloadYearCount(Payload):
    year: int
    cited_by_count: NonNegativeInt


class PayloadTopic(Payload):
    display_name: str | None = None
    subfield: Named | None = None
    field: Named | None = None
    domain: Named | None = None


class PayloadOpenAccess(Payload):
    oa_url: str | None = None


class WorkPayload(Payload):
    """One OpenAlex work, as much of it as MoE Atlas models."""

    id: OpenAlexId
    doi: str | None = None
    title: str | None = None
    display_name: str | None = None
    publication_date: dt.date | None = None
    publication_year: int | None = None
    type: str | None = None
    primary_location: PayloadLocation | None = None
    authorships: Annotated[list[PayloadAuthorship], BeforeValidator(_none_as_empty_list)] = []
    cited_by_count: Annotated[NonNegativeInt, BeforeValidator(_none_as(0))] = 0
    counts_by_year: Annotated[list[PayloadYearCount], BeforeValidator(_none_as_empty_list)] = []
    referenced_works: Annotated[list[str], BeforeValidator(_none_as_empty_list)] = []
    primary_topic: PayloadTopic | None = None
    open_access: PayloadOpenAccess | None = None
    abstract_inverted_index: dict[str, list[int]] | None = None
    is_retracted: Annotated[bool, BeforeValidator(_none_as(False))] = False
    updated_date: dt.datetime | None = None

    @property
    def title_text(self) -> str | None:
        return self.display_name or self.title

    @property
    def doi_bare(self) -> str | None:
        """The DOI in the catalog's bare lowercase form, or ``None`` if absent or not a DOI."""
        if not self.doi:
            return None
        bare = _DOI_PREFIX_RE.sub("", self.doi.strip()).lower()
        if not _DOI_RE.fullmatch(bare):
            log.warning("work %s: ignoring DOI %r, which is not of the form 10.x/y", self.id, self.doi)
            return None
        return bare


def describe_validation_error(exc: ValidationError) -> str:
    """``field 'a.b': message`` for the first few errors of a payload."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"field {loc!r}: {err['msg']}")
    more = len(exc.errors()) - 3
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def work_id_of(data: object) -> str | None:
    """The short work id of a raw payload, if it carries a readable one."""
    if isinstance(data, Mapping) and isinstance(data.get("id"), str):
        m = _OPENALEX_WORK_RE.fullmatch(data["id"].strip())
        if m:
            return m.group(1).upper()
    return None


def parse_work(data: object) -> WorkPayload:
    """Validate one raw work object; ``PayloadError`` names the work and the bad field."""
    if not isinstance(data, Mapping):
        raise PayloadError(f"expected a work object, got {type(data).__name__}")
    try:
        return WorkPayload.model_validate(data)
    except ValidationError as exc:
        who = work_id_of(data) or "work without a readable id"
        raise PayloadError(f"{who}: unexpected shape: {describe_validation_error(exc)}") from None


def rebuild_abstract(index: Mapping[str, Iterable[int]] | None) -> str | None:
    """Plain abstract from OpenAlex's inverted index (word -> positions), words in position order."""
    if not index:
        return None
    placed = sorted((pos, word) for word, positions in index.items() for pos in positions)
    return " ".join(word for _, word in placed) or None


def fill_counts(
    counts: Iterable[PayloadYearCount], publication_year: int | None, current_year: int
) -> list[YearCount]:
    """Citations per year, ascending, with the years OpenAlex omits (zero citations) filled in.

    The series ends at the latest year OpenAlex reports and starts at the earlier of the first
    reported year and the publication year, but never before OpenAlex's window of the ten years
    up to ``current_year`` (years before it are unknown, not zero). No reported year means an
    empty series.
    """
    by_year: dict[int, int] = {}
    for c in counts:
        by_year[c.year] = by_year.get(c.year, 0) + c.cited_by_count
    if not by_year:
        return []
    last = max(by_year)
    start = min(by_year)
    if publication_year is not None:
        start = min(start, max(publication_year, current_year - COUNTS_WINDOW_YEARS + 1))
    return [YearCount(year=y, cited_by_count=by_year.get(y, 0)) for y in range(start, last + 1)]


def _short_work_ids(values: Iterable[str], owner: str) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for v in values:
        m = _OPENALEX_WORK_RE.fullmatch(v.strip()) if isinstance(v, str) else None
        if not m:
            log.warning("work %s: ignoring referenced work %r, which is not an OpenAlex work id", owner, v)
            continue
        wid = m.group(1).upper()
        if wid not in seen:
            seen.add(wid)
            out.append(wid)
    return out


def cap_text(text: str | None, limit: int, owner: str, field: str) -> str | None:
    """``text`` cut to ``limit`` characters (at a word boundary, with "…"), with a warning when cut."""
    if text is None or len(text) <= limit:
        return text
    cut = text[: limit - 1]
    if " " in cut[limit // 2 :]:
        cut = cut.rsplit(" ", 1)[0]
    log.warning("work %s: %s has %d characters; storing the first %d", owner, field, len(text), len(cut))
    return cut + "…"


def _author(a: PayloadAuthorship, owner: str) -> Author | None:
    name = (a.author.display_name if a.author else None) or a.raw_author_name
    if not name:
        return None
    name = cap_text(name, MAX_TEXT_CHARS, owner, "an author name")
    author_id = None
    if a.author and a.author.id:
        m = _OPENALEX_AUTHOR_RE.fullmatch(a.author.id.strip())
        author_id = m.group(1).upper() if m else None
    institutions = [
        Institution(
            name=cap_text(i.display_name, MAX_TEXT_CHARS, owner, "an institution name"),
            ror=i.ror,
            country_code=i.country_code,
        )
        for i in a.institutions
        if i.display_name
    ]
    return Author(
        name=name,
        openalex_id=author_id,
        orcid=a.author.orcid if a.author else None,
        institutions=institutions,
    )


def _topic(t: PayloadTopic | None, owner: str) -> Topic | None:
    if t is None or not t.display_name:
        return None

    def name(n: Named | None) -> str | None:
        return cap_text(n.display_name if n else None, MAX_TEXT_CHARS, owner, "a topic name")

    return Topic(
        name=cap_text(t.display_name, MAX_TEXT_CHARS, owner, "the topic"),
        subfield=name(t.subfield),
        field=name(t.field),
        domain=name(t.domain),
    )


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:  # OpenAlex timestamps are UTC without an offset
        return value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def to_record(
    work: WorkPayload,
    *,
    slug: str,
    resolved_by: ResolvedBy,
    fetched_at: dt.datetime,
    merged_from: Iterable[str] = (),
    catalog_ids: Mapping[str, str] | None = None,
) -> FetchedRecord:
    """The stored record of ``slug`` built from one OpenAlex payload.

    ``catalog_ids`` maps OpenAlex work ids of catalog works to their slugs; it yields
    ``referenced_in_catalog``. ``fetched_at`` is stored in UTC. Text longer than
    ``MAX_TEXT_CHARS`` (``MAX_ABSTRACT_CHARS`` for the abstract) is cut, with a warning.
    """
    title = cap_text(work.title_text, MAX_TEXT_CHARS, work.id, "the title")
    if not title:
        raise PayloadError(f"{work.id}: no title (display_name and title are both empty)")
    catalog_ids = catalog_ids or {}
    refs = _short_work_ids(work.referenced_works, work.id)
    in_catalog = sorted({catalog_ids[r] for r in refs if r in catalog_ids} - {slug})
    loc = work.primary_location
    venue = None
    if loc is not None:
        venue = (loc.source.display_name if loc.source else None) or loc.raw_source_name
        venue = cap_text(venue, MAX_TEXT_CHARS, work.id, "the venue")
    merged = sorted(set(merged_from) - {work.id})
    fetched_utc = _utc(fetched_at)
    assert fetched_utc is not None
    try:
        return FetchedRecord(
            slug=slug,
            openalex_id=work.id,
            resolved_by=resolved_by,
            merged_from=merged,
            doi=work.doi_bare,
            title=title,
            publication_date=work.publication_date,
            publication_year=work.publication_year,
            type=work.type,
            venue=venue,
            authors=[a for a in (_author(x, work.id) for x in work.authorships) if a is not None],
            cited_by_count=work.cited_by_count,
            counts_by_year=fill_counts(work.counts_by_year, work.publication_year, fetched_utc.year),
            referenced_works=refs,
            referenced_in_catalog=in_catalog,
            primary_topic=_topic(work.primary_topic, work.id),
            oa_url=cap_text(
                work.open_access.oa_url if work.open_access else None, MAX_TEXT_CHARS, work.id, "oa_url"
            ),
            abstract=cap_text(
                rebuild_abstract(work.abstract_inverted_index), MAX_ABSTRACT_CHARS, work.id, "the abstract"
            ),
            is_retracted=work.is_retracted,
            updated_date=_utc(work.updated_date),
            fetched_at=fetched_utc,
        )
    except ValidationError as exc:
        raise PayloadError(f"{work.id}: cannot store as {slug!r}: {describe_validation_error(exc)}") from None
