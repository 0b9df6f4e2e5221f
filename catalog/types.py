"""Shared annotated types for identifiers and dates used across the catalog models.

Each type normalizes what people commonly paste (URLs, mixed case) into one canonical form and
rejects anything else with a message that names the offending value.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field

_SLUG_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_ARXIV_NEW_RE = re.compile(r"^\d{4}\.\d{4,5}$")
_ARXIV_OLD_RE = re.compile(r"^[a-z\-]+(?:\.[A-Z]{2})?/\d{7}$")
_DOI_RE = re.compile(r"^10\.\d{4,9}/\S+$")
_OPENALEX_RE = re.compile(r"^W\d+$")
_SURVEY_DATE_RE = re.compile(r"^(\d{4})(?:-(\d{1,2})(?:-(\d{1,2}))?)?$")


def _check_slug(value: str) -> str:
    if not _SLUG_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a slug (lowercase letters, digits and single hyphens)")
    return value


def _norm_arxiv(value: object) -> object:
    if not isinstance(value, str):
        return value
    v = value.strip()
    for prefix in ("https://arxiv.org/abs/", "http://arxiv.org/abs/", "arXiv:", "arxiv:"):
        if v.startswith(prefix):
            v = v[len(prefix) :]
    return re.sub(r"v\d+$", "", v)


def _check_arxiv(value: str) -> str:
    if not (_ARXIV_NEW_RE.fullmatch(value) or _ARXIV_OLD_RE.fullmatch(value)):
        raise ValueError(f"{value!r} is not an arXiv id (expected e.g. '2401.04088')")
    return value


def _norm_doi(value: object) -> object:
    if not isinstance(value, str):
        return value
    v = value.strip()
    for prefix in ("https://doi.org/", "http://doi.org/", "https://dx.doi.org/", "doi:"):
        if v.lower().startswith(prefix):
            v = v[len(prefix) :]
    return v.lower()


def _check_doi(value: str) -> str:
    if not _DOI_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a DOI (expected e.g. '10.1109/ijcnn60899.2024.10650737')")
    return value


def _norm_openalex(value: object) -> object:
    if not isinstance(value, str):
        return value
    v = value.strip()
    for prefix in ("https://openalex.org/", "http://openalex.org/"):
        if v.startswith(prefix):
            v = v[len(prefix) :]
    return v[:1].upper() + v[1:]


def _check_openalex(value: str) -> str:
    if not _OPENALEX_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not an OpenAlex work id (expected e.g. 'W4402351149')")
    return value


def _check_survey_date(value: str) -> str:
    m = _SURVEY_DATE_RE.fullmatch(value)
    if not m:
        raise ValueError(f"{value!r} is not a date in the survey's form (YYYY, YYYY-M or YYYY-M-D)")
    month, day = m.group(2), m.group(3)
    if month is not None and not 1 <= int(month) <= 12:
        raise ValueError(f"{value!r} has month {month} outside 1..12")
    if day is not None and not 1 <= int(day) <= 31:
        raise ValueError(f"{value!r} has day {day} outside 1..31")
    return value


def _str_date(value: object) -> object:
    # YAML reads 2024-05-15 as a date; the survey's form is kept as text.
    return value.isoformat() if hasattr(value, "isoformat") else value


Slug = Annotated[str, AfterValidator(_check_slug)]
"""Stable identifier of a work or taxonomy node: lowercase kebab-case."""

ArxivId = Annotated[str, BeforeValidator(_norm_arxiv), AfterValidator(_check_arxiv)]
"""arXiv identifier without version (``2401.04088``); URLs and ``arXiv:`` prefixes are stripped."""

DOI = Annotated[str, BeforeValidator(_norm_doi), AfterValidator(_check_doi)]
"""DOI in bare lowercase form (``10.x/y``); ``https://doi.org/`` prefixes are stripped."""

OpenAlexId = Annotated[str, BeforeValidator(_norm_openalex), AfterValidator(_check_openalex)]
"""OpenAlex work id in short form (``W4402351149``)."""

SurveyDate = Annotated[str, BeforeValidator(_str_date), AfterValidator(_check_survey_date)]
"""A date exactly as the survey prints it: ``2024``, ``2023-12`` or ``2024-6-11``."""

ImplPath = Annotated[
    str,
    Field(pattern=r"^impls(\.[A-Za-z_][A-Za-z0-9_]*)+$"),
]
"""Dotted import path of a router class or preset in ``impls`` (``impls.routers.switch.SwitchRouter``)."""


def survey_date_key(value: str) -> tuple[int, int, int]:
    """Sortable ``(year, month, day)`` for a ``SurveyDate``, missing parts as 0."""
    m = _SURVEY_DATE_RE.fullmatch(value)
    assert m is not None
    return int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
