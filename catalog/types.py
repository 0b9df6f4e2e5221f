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
_PADDED_DATE_RE = re.compile(r"^\d{4}(?:-\d{2}(?:-\d{2})?)?$")

#: Journals of the controlled venue vocabulary (BibTeX ``@article``); every other venue is a
#: conference or workshop (``@inproceedings``). A venue is written ``"<name> <year>"``, with
#: `` Workshop`` after the year for a workshop of that conference, or exactly ``"arXiv"`` when
#: there is no peer-reviewed version.
JOURNALS: dict[str, str] = {
    "JMLR": "Journal of Machine Learning Research",
    "TMLR": "Transactions on Machine Learning Research",
    "TACL": "Transactions of the Association for Computational Linguistics",
    "TPAMI": "IEEE Transactions on Pattern Analysis and Machine Intelligence",
    "TNNLS": "IEEE Transactions on Neural Networks and Learning Systems",
    "Neural Computation": "Neural Computation",
    "Sci. China Inf. Sci.": "Science China Information Sciences",
    "AI Open": "AI Open",
    "SIGMOD": "Proceedings of the ACM on Management of Data",
    "Nature": "Nature",
}
#: Conferences of the controlled venue vocabulary, with the booktitle used in BibTeX.
CONFERENCES: dict[str, str] = {
    "NeurIPS": "Advances in Neural Information Processing Systems",
    "ICML": "Proceedings of the International Conference on Machine Learning",
    "ICLR": "International Conference on Learning Representations",
    "AAAI": "Proceedings of the AAAI Conference on Artificial Intelligence",
    "IJCAI": "Proceedings of the International Joint Conference on Artificial Intelligence",
    "ACL": "Proceedings of the Annual Meeting of the Association for Computational Linguistics",
    "EMNLP": "Proceedings of the Conference on Empirical Methods in Natural Language Processing",
    "NAACL": "Proceedings of the Conference of the North American Chapter of the ACL",
    "EACL": "Proceedings of the Conference of the European Chapter of the ACL",
    "COLING": "Proceedings of the International Conference on Computational Linguistics",
    "Findings of ACL": "Findings of the Association for Computational Linguistics: ACL",
    "Findings of EMNLP": "Findings of the Association for Computational Linguistics: EMNLP",
    "Findings of NAACL": "Findings of the Association for Computational Linguistics: NAACL",
    "CVPR": "Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition",
    "ICCV": "Proceedings of the IEEE/CVF International Conference on Computer Vision",
    "ECCV": "Proceedings of the European Conference on Computer Vision",
    "WACV": "Proceedings of the IEEE/CVF Winter Conference on Applications of Computer Vision",
    "MICCAI": "Medical Image Computing and Computer Assisted Intervention",
    "KDD": "Proceedings of the ACM SIGKDD Conference on Knowledge Discovery and Data Mining",
    "SIGIR": "Proceedings of the International ACM SIGIR Conference on Research and Development in "
    "Information Retrieval",
    "WWW": "Proceedings of the ACM Web Conference",
    "CIKM": "Proceedings of the ACM International Conference on Information and Knowledge Management",
    "RecSys": "Proceedings of the ACM Conference on Recommender Systems",
    "WSDM": "Proceedings of the ACM International Conference on Web Search and Data Mining",
    "MLSys": "Proceedings of Machine Learning and Systems",
    "PPoPP": "Proceedings of the ACM SIGPLAN Symposium on Principles and Practice of Parallel Programming",
    "SOSP": "Proceedings of the ACM Symposium on Operating Systems Principles",
    "OSDI": "USENIX Symposium on Operating Systems Design and Implementation",
    "NSDI": "USENIX Symposium on Networked Systems Design and Implementation",
    "USENIX ATC": "USENIX Annual Technical Conference",
    "EuroSys": "Proceedings of the European Conference on Computer Systems",
    "ASPLOS": "Proceedings of the ACM International Conference on Architectural Support for Programming "
    "Languages and Operating Systems",
    "ISCA": "Proceedings of the International Symposium on Computer Architecture",
    "MICRO": "Proceedings of the IEEE/ACM International Symposium on Microarchitecture",
    "HPCA": "IEEE International Symposium on High-Performance Computer Architecture",
    "SC": "Proceedings of the International Conference for High Performance Computing, Networking, "
    "Storage and Analysis",
    "ICS": "Proceedings of the ACM International Conference on Supercomputing",
    "IPDPS": "IEEE International Parallel and Distributed Processing Symposium",
    "INFOCOM": "IEEE Conference on Computer Communications",
    "DAC": "Design Automation Conference",
    "IJCNN": "International Joint Conference on Neural Networks",
    "COLM": "Conference on Language Modeling",
}
PREPRINT = "arXiv"
_VENUE_RE = re.compile(r"^(?P<name>.+) (?P<year>(?:19|20)\d{2})(?P<workshop> Workshop)?$")


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


def parse_venue(value: str) -> tuple[str, int, bool] | None:
    """``(name, year, is_workshop)`` of a vocabulary venue; ``None`` for ``"arXiv"``."""
    if value == PREPRINT:
        return None
    m = _VENUE_RE.fullmatch(value)
    if not m or (m.group("name") not in JOURNALS and m.group("name") not in CONFERENCES):
        raise ValueError(
            f"{value!r} is not a venue of the vocabulary: write '<venue> <year>' (e.g. 'JMLR 2022', "
            f"'ICLR 2021', 'NeurIPS 2023 Workshop') with a venue from catalog.types.JOURNALS or "
            f"CONFERENCES, or exactly 'arXiv'"
        )
    if m.group("workshop") and m.group("name") in JOURNALS:
        raise ValueError(f"{value!r}: a journal has no workshops")
    return m.group("name"), int(m.group("year")), bool(m.group("workshop"))


def _check_venue(value: str) -> str:
    parse_venue(value)
    return value


_ET_AL_RE = re.compile(r"\bet\.?\s*al\b|\bothers\b", re.IGNORECASE)


def _check_author(value: str) -> str:
    if not value or value != " ".join(value.split()):
        raise ValueError(f"author {value!r} has stray white space")
    if _ET_AL_RE.search(value):
        raise ValueError(f"author {value!r}: list every author by name, never 'et al.'")
    if any(ch in value for ch in ";|") or value.count(",") > 0:
        raise ValueError(f"author {value!r} looks like several names; give one name per entry")
    return value


def _pad_date(value: object) -> object:
    value = _str_date(value)
    if isinstance(value, str) and _SURVEY_DATE_RE.fullmatch(value):
        parts = value.split("-")
        return "-".join([parts[0], *(p.zfill(2) for p in parts[1:])])
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

SurveyDate = Annotated[str, BeforeValidator(_pad_date), AfterValidator(_check_survey_date)]
"""A date of first release, zero-padded: ``2024``, ``2023-12`` or ``2024-06-11`` (``2024-6-11`` is
read as ``2024-06-11``)."""

Venue = Annotated[str, AfterValidator(_check_venue)]
"""A published venue of the controlled vocabulary (``JMLR 2022``, ``ICLR 2021``) or ``arXiv``."""

AuthorName = Annotated[str, AfterValidator(_check_author)]
"""One author as printed on the paper (``William Fedus``), or an organisation (``Databricks``)."""

ImplPath = Annotated[
    str,
    Field(pattern=r"^impls(\.[A-Za-z_][A-Za-z0-9_]*)+$"),
]
"""Dotted import path of a router class or preset in ``impls``
(``impls.routers.token_choice.switch.SwitchRouter``)."""


def survey_date_key(value: str) -> tuple[int, int, int]:
    """Sortable ``(year, month, day)`` for a ``SurveyDate``, missing parts as 0."""
    m = _SURVEY_DATE_RE.fullmatch(value)
    assert m is not None
    return int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
