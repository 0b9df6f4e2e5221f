"""Pydantic models of the catalog: one model per entity.

Two layers are kept apart on disk and in the models:

* the **curated layer** (``TaxonomyNode``, ``Work``) is written by people, lives in
  ``catalog/data/taxonomy.yaml`` and ``catalog/data/works/<slug>.yaml`` and forbids unknown
  fields so that typos fail loudly;
* the **fetched layer** (``FetchedRecord``) is written only by ``scripts/refresh.py`` from
  OpenAlex into ``catalog/data/fetched/<slug>.json``. A refresh never touches curated files.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, NonNegativeInt, PositiveInt, model_validator

from catalog.types import (
    DOI,
    ArxivId,
    AuthorName,
    ImplPath,
    OpenAlexId,
    Slug,
    SurveyDate,
    Venue,
    survey_date_key,
)


class CuratedModel(BaseModel):
    """Base of every hand-written record: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class TaxonomyNode(CuratedModel):
    """One node of the survey's taxonomy tree (or a flagged extension of it)."""

    id: Slug
    """Stable slug, unique across the whole tree (e.g. ``token-choice``)."""
    title: str = Field(min_length=1)
    """Title exactly as the survey prints it (e.g. ``Non-trainable Token-Choice``)."""
    parent: Slug | None = None
    """Slug of the parent node; ``None`` only for the root."""
    order: NonNegativeInt
    """Position among its siblings, as in the survey."""
    description: str | None = None
    extension: bool = False
    """True for nodes MoE Atlas adds where no survey node fits; the site marks them."""
    extension_reason: str | None = None
    """Why no survey node fits; required for extensions."""

    @model_validator(mode="after")
    def _extension_has_reason(self) -> TaxonomyNode:
        if self.extension and not self.extension_reason:
            raise ValueError(f"extension node {self.id!r} needs an extension_reason")
        if not self.extension and self.extension_reason:
            raise ValueError(f"node {self.id!r} has an extension_reason but is not an extension")
        return self


class Identifiers(CuratedModel):
    """External identifiers of a work; all optional, at least the URL is usually known."""

    arxiv: ArxivId | None = None
    doi: DOI | None = None
    openalex: OpenAlexId | None = None
    """Pinned OpenAlex id; when set, a refresh uses it and never re-resolves."""
    url: HttpUrl | None = None
    """The link the survey gives (or the canonical landing page)."""


class Erratum(CuratedModel):
    """Something the survey's README got wrong about a work, and what the catalog records instead."""

    field: Literal["reference-number", "link", "title", "date", "venue", "placement", "duplicate-reference"]
    survey_says: str
    """What the survey prints, verbatim."""
    corrected: str
    """What the catalog records instead."""
    reason: str
    """How we know."""


Provenance = Literal["survey", "survey-unnumbered", "seed", "tracked"]
Fact = Literal["title", "authors", "venue", "doi", "arxiv", "code", "pdf", "date"]
"""The curated bibliographic facts that carry a source."""


class Work(CuratedModel):
    """A paper, or a model release without a paper (e.g. DBRX), as curated by people."""

    slug: Slug
    title: str = Field(min_length=1)
    short_name: str | None = None
    """The name the survey's taxonomy uses for it (``Mixtral-8x7B``), when it has one."""
    kind: Literal["paper", "model-release"] = "paper"
    year: PositiveInt
    """Year of first public appearance: the year of ``date`` when there is one (the survey dates
    arXiv v1 or the release), else the year of the arXiv id, else the publication year."""
    date: SurveyDate | None = None
    """First-release date (arXiv v1 or the release), zero-padded: as the survey gives it for the
    works it dates, else the first-release date when it is known."""
    authors: list[AuthorName] = []
    """Every author, in the order printed on the paper; the organisation for a model release.
    Empty only when nobody could verify them (``unverified["authors"]`` then says why)."""
    venue: Venue | None = None
    """Where the work was published: ``"<venue> <year>"`` from the controlled vocabulary
    (``JMLR 2022``), ``arXiv`` when there is no peer-reviewed version, ``None`` for a model release
    without a paper or when nobody could verify it."""
    survey_venue: str | None = None
    """The venue label the survey prints (``ArXiv 2022``), kept as it is; errata say where it is wrong."""
    code: HttpUrl | None = None
    """The official code repository the paper or its authors name (never a reimplementation)."""
    pdf: HttpUrl | None = None
    """A public PDF of the paper."""
    sources: dict[Fact, HttpUrl] = {}
    """For each curated fact, the public page it was read from."""
    unverified: dict[Fact, str] = {}
    """For a fact left empty, why nobody could verify it."""
    caveats: dict[Fact, str] = {}
    """For a fact given, what a reader should know (another version's title, a spelling variant)."""
    added: dt.date | None = None
    """When the work entered the catalog (stable; the Atom feed and "What's new" use it)."""
    ids: Identifiers = Identifiers()
    survey_ref: PositiveInt | None = None
    """Reference number in the survey's list (1..128), ``None`` for unnumbered entries."""
    provenance: Provenance = "survey"
    """How the work entered the catalog."""
    placements: list[Slug] = Field(min_length=1)
    """Taxonomy nodes the work sits under (several, as in the survey)."""
    tags: list[Slug] = []
    notes: str | None = None
    errata: list[Erratum] = []
    implementations: list[ImplPath] = []
    """Import paths of the router classes or presets in ``impls`` that implement it."""

    @model_validator(mode="after")
    def _facts_are_consistent(self) -> Work:
        if len(set(self.authors)) != len(self.authors):
            twice = sorted({a for a in self.authors if self.authors.count(a) > 1})
            raise ValueError(f"authors list a name twice: {twice}")
        for fact in self.unverified:
            if self._fact(fact):
                raise ValueError(f"unverified[{fact!r}] says why {fact} is empty, but {fact} is given")
        for fact in self.sources:
            if not self._fact(fact):
                raise ValueError(f"sources[{fact!r}] gives a source for {fact}, which is empty")
        return self

    def _fact(self, fact: str) -> object:
        if fact in ("doi", "arxiv"):
            return getattr(self.ids, fact)
        return getattr(self, fact)

    @model_validator(mode="after")
    def _year_matches_date(self) -> Work:
        if self.date is not None and survey_date_key(self.date)[0] not in (self.year, self.year - 1):
            # The survey dates arXiv v1; the year is the publication year (may be one later).
            raise ValueError(f"year {self.year} does not match date {self.date!r}")
        if len(set(self.placements)) != len(self.placements):
            raise ValueError(f"placements list a node twice: {self.placements}")
        return self

    @property
    def sort_key(self) -> tuple[int, int, int, str]:
        """Chronological order: survey date when known, else the year; slug breaks ties."""
        if self.date is not None:
            return (*survey_date_key(self.date), self.slug)
        return (self.year, 0, 0, self.slug)

    @property
    def display_name(self) -> str:
        return self.short_name or self.title


# --------------------------------------------------------------------------------------------
# Fetched layer (OpenAlex)
# --------------------------------------------------------------------------------------------


class FetchedModel(BaseModel):
    """Base of records written by the refresh; stored files are ours, so unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Institution(FetchedModel):
    name: str
    ror: str | None = None
    country_code: str | None = None


class Author(FetchedModel):
    name: str
    openalex_id: str | None = None
    orcid: str | None = None
    institutions: list[Institution] = []


class YearCount(FetchedModel):
    year: int
    cited_by_count: NonNegativeInt


class Topic(FetchedModel):
    name: str
    subfield: str | None = None
    field: str | None = None
    domain: str | None = None


ResolvedBy = Literal["pinned", "doi", "arxiv-doi", "title-search"]


class FetchedRecord(FetchedModel):
    """OpenAlex metadata of one work, as last fetched. Text fields are stored raw (unescaped)."""

    slug: Slug
    openalex_id: OpenAlexId
    resolved_by: ResolvedBy
    """How the OpenAlex id was found."""
    merged_from: list[OpenAlexId] = []
    """Earlier ids that OpenAlex merged into ``openalex_id``."""
    doi: DOI | None = None
    title: str
    publication_date: dt.date | None = None
    publication_year: int | None = None
    type: str | None = None
    venue: str | None = None
    authors: list[Author] = []
    cited_by_count: NonNegativeInt = 0
    counts_by_year: list[YearCount] = []
    """Citations per year, ascending, missing years filled with zeros."""
    referenced_works: list[OpenAlexId] = []
    referenced_in_catalog: list[Slug] = []
    """Slugs of catalog works among ``referenced_works``."""
    primary_topic: Topic | None = None
    oa_url: str | None = None
    abstract: str | None = None
    is_retracted: bool = False
    updated_date: dt.datetime | None = None
    """OpenAlex's own last-change timestamp."""
    fetched_at: dt.datetime
    """When MoE Atlas fetched this record (UTC)."""
