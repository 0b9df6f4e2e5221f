"""Small catalogs for the site tests, written to a temporary folder, and a shared site build.

:func:`write_catalog` writes a five-node-deep taxonomy with an extension node, a handful of works
(fetched and not, a model release, errata, in-catalog references both ways) and, with
``xss=True``, a work whose every text field is an injection attempt.

:func:`built_site` builds a site once per test session even under pytest-xdist: the first worker
to ask builds it under a file lock in the session's shared temporary folder, the others reuse it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the generator lives in the repository's scripts/ package
    sys.path.insert(0, str(REPO))

XSS = (
    '<script>window.__xss=1</script></title><img src=x onerror="window.__xss=2">'
    " *b* [l](javascript:x) $x$ | y"
)
"""Text that would run script, break out of <title>, or render as Markdown/math if not escaped."""
XSS_TITLE = "Injected " + XSS
LONG_ABSTRACT = (
    "Sparse mixture-of-experts models route each token to a few experts. " * 30
    + "THE-END-OF-THE-ABSTRACT-MARKER"
)

NODES = [
    ("mixture-of-experts", "Mixture of Experts (MoE)", None, 0, {}),
    ("algorithm", "Algorithm", "mixture-of-experts", 0, {}),
    ("gating-function", "Gating Function", "algorithm", 0, {}),
    ("sparse", "Sparse", "gating-function", 0, {}),
    ("token-choice", "Token-Choice", "sparse", 0, {"description": "Each token picks its experts."}),
    ("expert-choice", "Expert-Choice", "sparse", 1, {}),
    (
        "load-balancing",
        "Load Balancing",
        "gating-function",
        1,
        {"extension": True, "extension_reason": "Balancing methods fit no single survey node."},
    ),
    ("system", "System", "mixture-of-experts", 1, {}),
    ("computation", "Computation", "system", 0, {}),
    ("application", "Application", "mixture-of-experts", 2, {}),
    ("nlp", "NLP", "application", 0, {}),
]


def _work(slug: str, title: str, year: int, placements: list[str], **extra: object) -> dict:
    return {"slug": slug, "title": title, "year": year, "placements": placements, **extra}


WORKS = [
    _work(
        "shazeer-2017",
        "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer",
        2017,
        ["token-choice", "nlp"],
        short_name="Shazeer et al.",
        date="2017-1-23",
        authors=["Noam Shazeer", "Azalia Mirhoseini", "Krzysztof Maziarz"],
        venue="ICLR 2017",
        unverified={"code": "No official repository is named."},
        survey_ref=1,
        ids={"arxiv": "1701.06538"},
    ),
    _work(
        "switch-transformer",
        "Switch Transformers: Scaling to Trillion Parameter Models with Simple and Efficient Sparsity",
        2022,
        ["token-choice", "nlp"],
        short_name="Switch Transformer",
        date="2021-1-11",
        authors=["William Fedus", "Barret Zoph", "Noam Shazeer"],
        venue="JMLR 2022",
        survey_venue="ArXiv 2022",
        code="https://github.com/google-research/t5x",
        pdf="https://arxiv.org/pdf/2101.03961",
        sources={
            "authors": "https://arxiv.org/abs/2101.03961",
            "venue": "https://jmlr.org/papers/v23/21-0998.html",
            "code": "https://github.com/google-research/t5x",
        },
        survey_ref=5,
        ids={"arxiv": "2101.03961"},
        errata=[
            {
                "field": "title",
                "survey_says": "Swith Transformer",
                "corrected": "Switch Transformer",
                "reason": "A typo in the survey's taxonomy.",
            }
        ],
        implementations=["impls.routers.token_choice.fake.FakeRouter"],
    ),
    _work(
        "efficient-routing-sparse-moe",
        "Efficient Routing in Sparse Mixture-of-Experts",
        2024,
        ["token-choice", "load-balancing"],
        venue="IJCNN 2024",
        provenance="seed",
        ids={"doi": "10.1109/ijcnn60899.2024.10650737", "openalex": "W4402351149"},
        notes="Token-to-expert assignment as optimal transport, solved with Sinkhorn iterations.",
    ),
    _work(
        "expert-choice",
        "Mixture-of-Experts with Expert Choice Routing",
        2022,
        ["expert-choice"],
        survey_ref=27,
        ids={"arxiv": "2202.09368"},
    ),
    _work(
        "fastmoe", "FastMoE: A Fast Mixture-of-Expert Training System", 2021, ["computation"], survey_ref=7
    ),
    _work(
        "dbrx",
        "DBRX",
        2024,
        ["nlp"],
        kind="model-release",
        provenance="survey-unnumbered",
        authors=["Databricks"],
    ),
]

XSS_WORK = _work(
    "xss-work",
    XSS_TITLE,
    2023,
    ["token-choice", "computation"],
    short_name="Inj " + XSS,
    survey_venue="Venue " + XSS,
    authors=["Ann <script>window.__xss=3</script>", "Bo *b* $x$ [l](javascript:x)"],
    provenance="tracked",
    notes="Notes " + XSS,
    errata=[
        {
            "field": "venue",
            "survey_says": "Says " + XSS,
            "corrected": "Fixed " + XSS,
            "reason": "Reason " + XSS,
        }
    ],
)

FETCHED_AT = "2026-11-01T12:00:00Z"


def _record(slug: str, title: str, **extra: object) -> dict:
    return {
        "slug": slug,
        "openalex_id": extra.pop("openalex_id"),
        "resolved_by": "pinned",
        "title": title,
        "fetched_at": FETCHED_AT,
        **extra,
    }


FETCHED = [
    _record(
        "switch-transformer",
        WORKS[1]["title"],
        openalex_id="W3128257385",
        publication_year=2022,
        venue="Journal of Machine Learning Research",
        authors=[{"name": "William Fedus"}, {"name": "Barret Zoph"}, {"name": "Noam Shazeer"}],
        cited_by_count=1234,
        counts_by_year=[
            {"year": y, "cited_by_count": c} for y, c in [(2021, 40), (2022, 200), (2023, 0), (2024, 600)]
        ],
        referenced_in_catalog=["shazeer-2017"],
        abstract=LONG_ABSTRACT,
        updated_date="2026-10-30T00:00:00",
    ),
    _record(
        "efficient-routing-sparse-moe",
        WORKS[2]["title"],
        openalex_id="W4402351149",
        doi="10.1109/ijcnn60899.2024.10650737",
        publication_year=2024,
        authors=[{"name": "Masoumeh Zareapoor"}, {"name": "Pourya Shamsolmoali"}],
        cited_by_count=3,
        counts_by_year=[{"year": 2025, "cited_by_count": 3}],
        referenced_in_catalog=["switch-transformer", "shazeer-2017"],
    ),
]

XSS_RECORD = _record(
    "xss-work",
    XSS_TITLE,
    openalex_id="W100",
    venue="Fetched venue " + XSS,
    authors=[{"name": "Author " + XSS}],
    abstract="Abstract " + XSS,
    referenced_in_catalog=["switch-transformer"],
    primary_topic={"name": "Topic " + XSS},
)


def write_catalog(root: Path, xss: bool = False, fetched: bool = True) -> Path:
    """Write a fixture catalog under ``root/data`` and return that data folder."""
    data = Path(root) / "data"
    (data / "works").mkdir(parents=True, exist_ok=True)
    (data / "fetched").mkdir(parents=True, exist_ok=True)
    nodes = [{"id": i, "title": t, "parent": p, "order": o, **x} for i, t, p, o, x in NODES]
    (data / "taxonomy.yaml").write_text(yaml.safe_dump({"nodes": nodes}, sort_keys=False), encoding="utf-8")
    works = [*WORKS, XSS_WORK] if xss else WORKS
    for w in works:
        (data / "works" / f"{w['slug']}.yaml").write_text(
            yaml.safe_dump(w, sort_keys=False), encoding="utf-8"
        )
    if fetched:
        for r in [*FETCHED, XSS_RECORD] if xss else FETCHED:
            (data / "fetched" / f"{r['slug']}.json").write_text(json.dumps(r, indent=1), encoding="utf-8")
    return data


def site_env() -> dict[str, str]:
    return {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}


def run_site(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/site.py ARGS...`` from the repository root."""
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "site.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=site_env(),
    )


def built_site(tmp_path_factory, name: str, xss_fixture: bool = False) -> Path:
    """The built site ``name`` (the real catalog, or the fixture catalog with the injected work).

    Built once per session; every xdist worker shares the result. A failed build raises with
    MkDocs' output, and the next caller retries rather than reusing a broken folder.
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root = base / f"site-{name}"
    root.mkdir(exist_ok=True)
    done = root / "BUILT"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.exists():
                args = ["build", "--out", str(root / "public"), "--staging", str(root / "docs")]
                if xss_fixture:
                    args += ["--data-dir", str(write_catalog(root, xss=True))]
                proc = run_site(*args)
                if proc.returncode != 0:
                    raise AssertionError(
                        f"site build failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
                    )
                done.write_text(dt.datetime.now().isoformat())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root / "public"
