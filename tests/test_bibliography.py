"""The curated bibliography: its model rules, the committed facts, BibTeX, the feed, drafts, MkDocs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import bibtexparser
import feedparser
import pytest
import yaml
from openalex_server import make_work, serve, write_catalog
from pydantic import ValidationError
from site_fixtures import REPO

import catalog
from catalog.models import FetchedRecord, Work
from catalog.quality import compare
from catalog.types import JOURNALS, parse_venue
from scripts.sitegen.bibtex import bibliography, bibtex_entry
from scripts.sitegen.context import SiteContext
from scripts.sitegen.pages_people import atom_feed

SCRIPTS = REPO / "scripts"


def work(**extra) -> Work:
    base = {"slug": "w", "title": "A Router", "year": 2024, "placements": ["token-choice"]}
    return Work.model_validate({**base, **extra})


# -- model rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "venue", ["JMLR 2022", "ICLR 2021", "NeurIPS 2023 Workshop", "Findings of EMNLP 2023", "arXiv"]
)
def test_vocabulary_venues_are_accepted(venue):
    assert work(venue=venue).venue == venue


@pytest.mark.parametrize(
    "venue",
    ["ArXiv 2024", "NIPS 2022", "ICML", "Journal of Machine Learning Research 2022", "JMLR 2022 Workshop"],
)
def test_venues_outside_the_vocabulary_are_errors(venue):
    with pytest.raises(ValidationError, match="venue"):
        work(venue=venue)


@pytest.mark.parametrize("name", ["W. Fedus et al.", "Fedus, William", "A and others", " Noam  Shazeer"])
def test_author_names_must_be_single_full_names(name):
    with pytest.raises(ValidationError):
        work(authors=[name])


def test_an_author_listed_twice_is_an_error():
    with pytest.raises(ValidationError, match="twice"):
        work(authors=["Noam Shazeer", "Noam Shazeer"])


def test_urls_are_checked_and_sources_need_a_fact():
    with pytest.raises(ValidationError, match="code"):
        work(code="not a url")
    with pytest.raises(ValidationError, match="empty"):
        work(sources={"code": "https://github.com/x/y"})  # a source for a fact that is not there
    with pytest.raises(ValidationError, match="is given"):
        work(code="https://github.com/x/y", unverified={"code": "none found"})


def test_validate_reports_bad_vocabulary_urls_and_et_al_with_file_and_line(tmp_path, data_copy):
    path = data_copy / "works" / "switch-transformer.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc["venue"] = "Journal of ML 2022"
    doc["code"] = "github.com/no-scheme"
    doc["authors"] = ["William Fedus", "Barret Zoph et al."]
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "validate.py"), "--no-imports", "--data-dir", str(data_copy)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    out = proc.stdout
    assert "switch-transformer.yaml:" in out
    for field in ("[venue]", "[code]", "[authors.1]"):
        assert field in out, out
    assert "et al." in out


def test_the_data_quality_report_lists_disagreements_but_is_no_error():
    rec = FetchedRecord.model_validate(
        {
            "slug": "w",
            "openalex_id": "W1",
            "resolved_by": "pinned",
            "title": "A Router",
            "publication_year": 2019,
            "venue": "Some Workshop on Things",
            "authors": [{"name": "Ann Other"}, {"name": "Bo Smith"}],
            "fetched_at": "2026-11-01T00:00:00Z",
        }
    )
    found = {d.fact: d for d in compare(work(authors=["Ann Other"], venue="ICLR 2024"), rec)}
    assert set(found) == {"authors", "year", "venue"}
    assert "1: Ann Other" in found["authors"].curated and "2: Ann Other, Bo Smith" in found["authors"].fetched
    agree = rec.model_copy(update={"publication_year": 2024, "venue": "ICLR", "authors": rec.authors[:1]})
    assert compare(work(authors=["Ann Other"], venue="ICLR 2024"), agree) == []


# -- the committed catalog ----------------------------------------------------------------------


def test_every_work_has_authors_a_venue_and_notes(real_catalog):
    for w in real_catalog.works:
        assert w.authors, w.slug
        assert w.notes, w.slug
        if w.kind == "model-release":
            assert w.venue is None and len(w.authors) == 1, w.slug
        else:
            assert w.venue is not None, w.slug
        given = {
            "title": w.title, "authors": w.authors, "venue": w.venue, "doi": w.ids.doi,
            "arxiv": w.ids.arxiv, "code": w.code, "pdf": w.pdf, "date": w.date,
        }  # fmt: skip
        for fact, value in given.items():
            assert not value or fact in w.sources, f"{w.slug}: {fact} has no source"
        for fact in ("code", "pdf"):
            assert given[fact] or fact in w.unverified, f"{w.slug}: no {fact} and no reason"


def test_titles_are_as_printed_and_dates_zero_padded(real_catalog):
    for w in real_catalog.works:
        letters = [c for c in w.title if c.isalpha()]
        assert sum(c.isupper() for c in letters) / len(letters) < 0.7, w.title
        if w.date:
            assert len(w.date) in (4, 7, 10), w.date


def test_switch_transformers_is_jmlr_2022_with_its_authors(real_catalog):
    w = real_catalog.work("switch-transformer")
    assert w.venue == "JMLR 2022" and w.survey_venue == "ArXiv 2022"
    assert w.authors == ["William Fedus", "Barret Zoph", "Noam Shazeer"]
    assert any(e.field == "venue" and e.corrected == "JMLR 2022" for e in w.errata)


def test_bibtex_of_every_work_parses_back_with_authors_and_the_right_type(real_catalog):
    entries = [bibtex_entry(w, real_catalog.fetched_for(w.slug)) for w in real_catalog.works]
    lib = bibtexparser.parse_string(bibliography(entries))
    assert not lib.failed_blocks
    by_key = {e.key: e for e in lib.entries}
    assert set(by_key) == {w.slug for w in real_catalog.works}
    for w in real_catalog.works:
        e = by_key[w.slug]
        assert e.fields_dict["author"].value, w.slug
        venue = parse_venue(w.venue) if w.venue else None
        if venue is None:
            assert e.entry_type == "misc", w.slug
        elif venue[0] in JOURNALS:
            assert e.entry_type == "article" and "journal" in e.fields_dict, w.slug
        else:
            assert e.entry_type == "inproceedings" and "booktitle" in e.fields_dict, w.slug
        if w.ids.arxiv:
            assert e.fields_dict["eprint"].value == w.ids.arxiv
        if w.ids.doi:
            assert e.fields_dict["doi"].value == w.ids.doi
    assert by_key["dbrx"].fields_dict["author"].value == "{Databricks}"
    assert by_key["switch-transformer"].fields_dict["journal"].value == "Journal of Machine Learning Research"


def test_the_atom_feed_parses_with_stable_entry_dates(real_catalog):
    ctx = SiteContext.build(real_catalog, [], set())
    text = atom_feed(ctx, "https://atlas.example/")
    feed = feedparser.parse(text)
    assert not feed.bozo, feed.bozo_exception
    assert feed.version == "atom10"
    assert len(feed.entries) == min(100, len(real_catalog.works))
    by_link = {e.link: e for e in feed.entries}
    switch = by_link["https://atlas.example/generated/works/switch-transformer/"]
    assert switch.published.startswith(real_catalog.work("switch-transformer").added.isoformat())
    assert [a.name for a in switch.authors] == ["William Fedus", "Barret Zoph", "Noam Shazeer"]
    assert atom_feed(ctx, "https://atlas.example/") == text  # no clock in it: the same every build


# -- track.py --draft -------------------------------------------------------------------------------


def test_draft_writes_a_skeleton_once_and_it_stays_invalid_until_placed(tmp_path, fake_openalex):
    data = write_catalog(tmp_path / "data", [{"slug": "existing", "title": "Existing work"}])
    fake_openalex.add(
        make_work(777, "Quantile Balancing for Routers", year=2026, doi="10.48550/arXiv.2607.01234")
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENALEX_")}
    cmd = [sys.executable, str(SCRIPTS / "track.py"), "--data-dir", str(data), "--draft", "W777"]
    with serve(fake_openalex) as url:
        env["OPENALEX_URL"] = url
        first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert first.returncode == 0, first.stderr
    path = data / "works" / "quantile-balancing-routers-2026.yaml"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Draft written by scripts/track.py --draft W777")
    doc = yaml.safe_load(text)
    assert doc["ids"] == {"openalex": "W777", "arxiv": "2607.01234"} and doc["placements"] == []
    assert second.returncode == 2 and "not overwriting" in second.stderr
    assert path.read_text(encoding="utf-8") == text
    cat, problems = catalog.collect(data)
    assert cat is None and any("placements" in (p.field or "") for p in problems)


# -- MkDocs as a user runs it -----------------------------------------------------------------------


def _fresh_copy(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", ".venv", "public", "generated", "artifacts", "__pycache__")
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def _mkdocs() -> list[str]:
    return [sys.executable, "-m", "mkdocs"]


@pytest.mark.slow
def test_plain_mkdocs_build_strict_works_on_a_fresh_copy(tmp_path):
    copy = _fresh_copy(tmp_path / "copy")
    env = {**os.environ, "MOE_ATLAS_MEASURE": "0", "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [*_mkdocs(), "build", "--strict"], cwd=copy, capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    public = copy / "public"
    for rel in (
        "index.html",
        "404.html",
        "sitemap.xml",
        "generated/authors/index.html",
        "generated/whats-new/index.html",
        "generated/feed.xml",
        "generated/works/switch-transformer/index.html",
    ):
        assert (public / rel).is_file(), rel
    assert "http://127.0.0.1:8000/generated/works/switch-transformer/" in (public / "sitemap.xml").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read().decode("utf-8")


@pytest.mark.slow
def test_mkdocs_serve_rebuilds_when_a_curated_file_changes(tmp_path):
    copy = _fresh_copy(tmp_path / "copy")
    port = _free_port()
    env = {**os.environ, "MOE_ATLAS_MEASURE": "0", "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.Popen(
        [*_mkdocs(), "serve", "--dev-addr", f"127.0.0.1:{port}"],
        cwd=copy, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/generated/works/dbrx/"
    try:
        deadline = time.monotonic() + 240
        page = ""
        while time.monotonic() < deadline:
            try:
                page = _get(url)
                break
            except OSError:
                assert proc.poll() is None, "mkdocs serve exited"
                time.sleep(1)
        assert "Databricks" in page
        path = copy / "catalog" / "data" / "works" / "dbrx.yaml"
        path.write_text(
            path.read_text(encoding="utf-8").replace("A model release announced", "A LIVERELOADED release"),
            encoding="utf-8",
        )
        while time.monotonic() < deadline:
            try:
                if "LIVERELOADED" in _get(url):
                    break
            except OSError:  # the server answers late while it rebuilds
                pass
            time.sleep(1)
        else:
            raise AssertionError("the page did not change after the curated file did")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_a_tracking_report_becomes_a_page_in_the_navigation(tmp_path, data_copy):
    import json

    from scripts.sitegen.generate import generate

    report = {
        "since": "2026-09-01",
        "tracked_works": 120,
        "citing_works_seen": 7,
        "untracked": [],
        "candidates": [
            {"openalex_id": "W9", "title": "A Router <b>Study</b>", "publication_date": "2026-10-02",
             "cites": ["switch-transformer"], "authors": ["Ann Other"], "doi": None, "venue": None,
             "cited_by_count": 0}
        ],
    }  # fmt: skip
    (data_copy / "tracking.json").write_text(json.dumps(report), encoding="utf-8")
    result = generate(catalog.load(data_copy), tmp_path / "docs")
    assert {"Tracking": "generated/tracking.md"} in result.nav[2]["Catalog"]
    page = (tmp_path / "docs" / "generated" / "tracking.md").read_text(encoding="utf-8")
    assert "A Router &lt;b&gt;Study&lt;/b&gt;" in page and "(works/switch-transformer.md)" in page
    (data_copy / "tracking.json").unlink()
    result = generate(catalog.load(data_copy), tmp_path / "docs")
    assert not (tmp_path / "docs" / "generated" / "tracking.md").exists()  # removed with its report
    assert all("Tracking" not in entry for entry in result.nav[2]["Catalog"][1:])
