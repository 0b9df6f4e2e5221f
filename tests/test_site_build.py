"""Full MkDocs builds: the real catalog in strict mode, and a fixture catalog full of injected markup."""

from __future__ import annotations

import html
import json
import posixpath
import subprocess
import sys
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
from site_fixtures import REPO, XSS_TITLE, built_site, run_site, site_env, write_catalog

import catalog

pytestmark = pytest.mark.slow


class PageParser(HTMLParser):
    """Collects links, scripts, event-handler attributes, <title> and the first <h1> of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.scripts: list[dict[str, str | None]] = []
        """Attributes of each <script>, its inline code under the key ``"code"``."""
        self.handlers: list[tuple[str, str]] = []
        self.title = ""
        self.h1 = ""
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for name, _ in attrs:
            if len(name) > 2 and name.lower().startswith("on"):  # onerror, onclick, ...
                self.handlers.append((tag, name))
        if tag in ("a", "link") and a.get("href"):
            self.links.append(a["href"])
        if tag in ("img", "script") and a.get("src"):
            self.links.append(a["src"])
        if tag == "script":
            self.scripts.append({**a, "code": ""})
        if tag in ("title", "script") or (tag == "h1" and not self.h1):
            self._in = tag

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in == "title":
            self.title += data
        elif self._in == "h1":
            self.h1 += data
        elif self._in == "script":
            self.scripts[-1]["code"] += data


def parse(path: Path) -> PageParser:
    p = PageParser()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def pages(public: Path) -> list[Path]:
    return sorted(public.rglob("*.html"))


@pytest.fixture(scope="module")
def real_site(tmp_path_factory) -> Path:
    return built_site(tmp_path_factory, "real")


@pytest.fixture(scope="module")
def xss_site(tmp_path_factory) -> Path:
    return built_site(tmp_path_factory, "xss", xss_fixture=True)


def test_real_catalog_builds_strict_with_a_page_per_work_and_node(real_site):
    cat = catalog.load()
    for w in cat.works:
        assert (real_site / "generated" / "works" / w.slug / "index.html").is_file(), w.slug
    for node in cat.taxonomy:
        sub = "" if node.parent is None else f"{node.id}/"
        assert (real_site / "generated" / "taxonomy" / sub / "index.html").is_file(), node.id
    for f in (
        "index.html",
        "generated/catalog/index.html",
        "generated/errata/index.html",
        "generated/routers/index.html",
        "generated/downloads/moe-atlas.bib",
        "generated/downloads/moe-atlas.json",
        "assets/vendor/katex/katex.min.js",
    ):
        assert (real_site / f).is_file(), f
    assert not (real_site / "overrides").exists() and not (real_site / "generated" / "_partials").exists()


def test_search_index_holds_titles_arxiv_ids_authors_and_router_names(real_site):
    import impls

    cat = catalog.load()
    index = json.loads((real_site / "search" / "search_index.json").read_text())
    by_page: dict[str, str] = {}
    for doc in index["docs"]:
        page = doc["location"].split("#")[0]
        by_page[page] = by_page.get(page, "") + " " + html.unescape(doc["title"] + " " + doc["text"])
    for w in cat.works:
        text = by_page[f"generated/works/{w.slug}/"]
        assert " ".join(w.title.split()) in " ".join(text.split()), w.slug
        if w.ids.arxiv:
            assert w.ids.arxiv in text, w.slug
        rec = cat.fetched_for(w.slug)
        for author in rec.authors[:3] if rec else []:
            assert author.name in text, (w.slug, author.name)
    assert "Sinkhorn" in by_page["generated/works/efficient-routing-sparse-moe/"]
    router_text = " ".join(v for k, v in by_page.items() if k.startswith("generated/routers/"))
    for name in impls.ROUTERS:
        assert name in router_text, name
    assert not any(k.startswith("generated/catalog/") for k in by_page)  # the big table stays out


def test_built_pages_have_no_broken_internal_links(real_site):
    checked = 0
    for page in pages(real_site):
        url_dir = posixpath.dirname(page.relative_to(real_site).as_posix())
        for link in parse(page).links:
            if link.startswith(("http://", "https://", "mailto:", "#", "data:", "javascript:")):
                continue
            link_path = link.split("#")[0].split("?")[0]
            if link_path.startswith("/"):  # 404.html links from the site root
                target = link_path.lstrip("/")
            else:
                target = posixpath.normpath(posixpath.join(url_dir, link_path))
            path = real_site / target
            assert path.is_file() or (path / "index.html").is_file(), f"{page}: broken link {link}"
            checked += 1
    assert checked > 1000


def test_injected_markup_shows_as_text_and_adds_no_script(xss_site):
    for page in pages(xss_site):
        p = parse(page)
        assert not p.handlers, f"{page}: event-handler attributes {p.handlers}"
        for s in p.scripts:
            src = s.get("src")
            if src:
                assert "assets/" in src, f"{page}: unexpected script {src}"
            assert "__xss" not in (s.get("code") or ""), f"{page}: injected inline script"
        assert "__xss" not in p.title or XSS_TITLE in p.title
    work = parse(xss_site / "generated" / "works" / "xss-work" / "index.html")
    assert work.h1.rstrip("¶").strip() == XSS_TITLE  # ¶: the permalink
    assert work.title.startswith(XSS_TITLE)
    table = (xss_site / "generated" / "catalog" / "index.html").read_text()
    assert html.escape(XSS_TITLE) in table
    search = (xss_site / "search" / "search_index.json").read_text()
    assert "<script" not in search and "<img" not in search
    assert "&lt;script&gt;window.__xss=1" in search


def test_cli_help_names_both_commands():
    proc = run_site("--help")
    assert proc.returncode == 0
    assert "build" in proc.stdout and "serve" in proc.stdout
    proc = run_site("serve", "--help")
    assert proc.returncode == 0 and "--port" in proc.stdout and "127.0.0.1" in proc.stdout


def test_cli_names_the_broken_file_of_a_bad_catalog(tmp_path):
    data = write_catalog(tmp_path)
    (data / "works" / "dbrx.yaml").write_text(
        "slug: dbrx\ntitle: DBRX\nyear: 2024\nplacements: [no-such-node]\n"
    )
    proc = run_site(
        "build", "--data-dir", str(data), "--out", str(tmp_path / "out"), "--staging", str(tmp_path / "d")
    )
    assert proc.returncode != 0
    assert "dbrx.yaml" in proc.stderr and "no-such-node" in proc.stderr


def test_serve_prints_the_local_url_and_serves_the_built_site(xss_site):
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "site.py"),
            "serve",
            "--no-build",
            "--out",
            str(xss_site),
            "--port",
            "0",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=site_env(),
    )
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line + proc.stderr.read() if proc.poll() is not None else line
        url = line.split()[line.split().index("at") + 1]
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = resp.read().decode()
        assert resp.status == 200 and "MoE Atlas" in body
    finally:
        proc.terminate()
        proc.wait(timeout=10)


SOFT_AND_NON_TRAINABLE = ("non-trainable-token-choice", "token-merging", "expert-merging")


def test_every_soft_and_non_trainable_work_page_shows_its_implementation(real_site):
    cat = catalog.load()
    works = [w for w in cat.works if set(w.placements) & set(SOFT_AND_NON_TRAINABLE) or w.slug == "dselect-k"]
    assert len(works) >= 14
    for w in works:
        page = (real_site / "generated" / "works" / w.slug / "index.html").read_text(encoding="utf-8")
        assert "No reference implementation yet" not in page, w.slug
        assert "/generated/routers/" in page or "../../routers/" in page, w.slug


def test_the_arena_page_is_built_from_the_committed_results(real_site):
    page = (real_site / "generated" / "arena" / "index.html").read_text(encoding="utf-8")
    assert 'id="atlas-arena"' in page and "The seed papers" in page
    assert "No arena results are committed yet." not in page
