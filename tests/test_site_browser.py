"""The built site in a real Chromium: rendering, search, navigation, the catalog table, escaping.

Drives Debian's ``/usr/bin/chromium`` through Playwright (never a downloaded browser). Without
Chromium the tests skip, except under ``CI=true`` where they fail: run ``make browser``.
Screenshots of the home, a work and a router page go to ``artifacts/screenshots/``.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from site_fixtures import REPO, XSS_TITLE, built_site

import catalog
from scripts.sitegen.context import SiteContext
from scripts.sitegen.routers import discover

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = REPO / "artifacts" / "screenshots"
SEED_TITLE = "Efficient Routing in Sparse Mixture-of-Experts"


def _need_chromium() -> None:
    if Path(CHROMIUM).is_file() or shutil.which(CHROMIUM):
        return
    message = f"Chromium not found at {CHROMIUM}: install it with `make browser` (apt-get install chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def _serve(public: Path) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(public))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser():
    _need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def real_url(tmp_path_factory, browser) -> Iterator[str]:
    yield from _serve(built_site(tmp_path_factory, "real"))


@pytest.fixture(scope="module")
def xss_url(tmp_path_factory, browser) -> Iterator[str]:
    yield from _serve(built_site(tmp_path_factory, "xss", xss_fixture=True))


class Watched:
    """A page plus every console error, page error, failed request and HTTP error it saw."""

    def __init__(self, page) -> None:
        self.page = page
        self.problems: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"))
        page.on("dialog", self._dialog)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


@pytest.fixture
def page(browser) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield Watched(context.new_page())
    context.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")  # the header tabs hide while the page is scrolled
    page.wait_for_timeout(300)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def heading(page) -> str:
    """The page's first <h1> without its permalink mark."""
    return page.locator("h1").first.inner_text().rstrip("¶").strip()


def search(page, query: str):
    page.locator("label.md-search__icon, .md-search__input").first.click()
    box = page.locator("input.md-search__input")
    box.fill("")
    box.press_sequentially(query, delay=20)  # Material searches on key events
    results = page.locator(".md-search-result__item")
    results.first.wait_for(timeout=15_000)
    return results


def test_home_renders_without_console_errors_or_failed_requests(page, real_url):
    page.page.goto(real_url, wait_until="networkidle")
    assert heading(page.page) == "MoE Atlas"
    assert page.page.locator("svg.atlas-chart rect").count() > 3
    assert page.page.locator(".grid.cards li").count() == 4
    shot(page.page, "home")
    assert page.problems == []


def test_search_finds_the_sinkhorn_seed_paper(page, real_url):
    page.page.goto(real_url, wait_until="networkidle")
    results = search(page.page, "Sinkhorn")
    titles = results.all_inner_texts()
    assert any(SEED_TITLE in t for t in titles), titles
    assert page.problems == []


def test_search_finds_works_by_arxiv_id_and_author(page, real_url):
    cat = catalog.load()
    work = next(w for w in cat.works if w.ids.arxiv)
    page.page.goto(real_url, wait_until="networkidle")
    assert any(work.title[:40] in t for t in search(page.page, work.ids.arxiv).all_inner_texts())
    rec = next((r for r in cat.fetched.values() if r.authors), None)
    if rec is not None:
        surname = rec.authors[0].name.split()[-1]
        assert any(cat.work(rec.slug).title[:40] in t for t in search(page.page, surname).all_inner_texts())


def _linked_work() -> tuple[str, str, str] | None:
    """(node id, work slug, router family) of a work with a router page, if any exists."""
    cat = catalog.load()
    ctx = SiteContext.build(cat, discover(measure=False), set())
    for work in cat.works:
        fams = ctx.families_of(work)
        if fams:
            return work.placements[0], work.slug, fams[0]
    return None


def test_taxonomy_node_to_work_to_router_page(page, real_url):
    import impls

    cat = catalog.load()
    linked = _linked_work()
    if impls.ROUTERS:
        assert linked is not None, "routers are registered but no catalog work links to one"
        node_id, slug, family = linked
    else:  # no routers yet: the same walk ends on the work page
        slug = "efficient-routing-sparse-moe"
        node_id, family = cat.work(slug).placements[0], None
    p = page.page
    p.goto(f"{real_url}generated/taxonomy/{node_id}/", wait_until="networkidle")
    assert heading(p) == cat.taxonomy[node_id].title
    p.get_by_role("link", name=cat.work(slug).title, exact=True).first.click()
    p.wait_for_url(f"**/generated/works/{slug}/")
    assert heading(p) == cat.work(slug).title
    shot(p, "work")
    if family is None:
        assert "No reference implementation yet" in p.content()
        return
    p.locator(f"article a[href$='routers/{family}/']").first.click()
    p.wait_for_url(f"**/generated/routers/{family}/")
    assert p.locator("table").count() >= 3  # routers, measurements, presets or papers
    if "$" in discover(measure=False)[0].body:
        p.locator(".katex").first.wait_for(timeout=10_000)  # math rendered by the vendored KaTeX
    shot(p, "router")
    source = p.locator("details", has_text="Show the source")
    source.locator("summary").click()
    assert "import torch" in source.inner_text()  # the module's real source
    assert page.problems == []


def test_catalog_table_sorts_and_filters(page, real_url):
    p = page.page
    p.goto(f"{real_url}generated/catalog/", wait_until="networkidle")
    n = len(catalog.load().works)
    assert p.locator("#atlas-count").inner_text() == f"{n} of {n} works"

    def column(i: int) -> list[str]:
        return p.locator(f"#atlas-catalog tbody tr:not([hidden]) td:nth-child({i})").all_inner_texts()

    p.locator("#atlas-catalog th", has_text="Year").click()  # ascending already: now descending
    years = [int(y) for y in column(1)]
    assert years == sorted(years, reverse=True) and years[0] > years[-1]
    p.locator("#atlas-catalog th", has_text="Title").click()
    titles = [t.lower() for t in column(3)]
    assert titles == sorted(titles)
    p.locator("#atlas-catalog th", has_text="Title").click()
    assert [t.lower() for t in column(3)] == sorted(titles, reverse=True)

    p.locator("#atlas-filter").fill("switch")
    shown = column(3)
    assert 0 < len(shown) < n and all(
        "switch" in r.lower() for r in p.locator("#atlas-catalog tbody tr:not([hidden])").all_inner_texts()
    )
    p.locator("#atlas-filter").fill("")
    p.locator("#atlas-branch").select_option("system")
    rows = p.locator("#atlas-catalog tbody tr:not([hidden])")
    assert 0 < rows.count() < n
    assert all(
        "system" in (b or "").split() for b in rows.evaluate_all("rs => rs.map(r => r.dataset.branches)")
    )
    p.locator("#atlas-branch").select_option("")
    p.locator("#atlas-filter").fill("Fedus")  # ST-MoE's eighth author: not in the cell, still found
    titles = column(3)
    assert any("Switch Transformers" in t for t in titles) and any("ST-MoE" in t for t in titles), titles
    p.locator("#atlas-filter").fill("")
    for _ in range(2):  # ascending, then descending: works without a count stay last both times
        p.locator("#atlas-catalog th", has_text="Citations").click()
        cites = column(6)
        counted = [c for c in cites if c != "—"]
        assert cites[: len(counted)] == counted and all(c == "—" for c in cites[len(counted) :])
    assert page.problems == []


def test_arena_table_sorts_numbers_with_missing_values_last(page, real_url):
    from scripts.sitegen.arena import load_results

    if not any(r["status"] == "ok" for r in load_results()):
        pytest.skip("no arena results committed")
    p = page.page
    p.goto(f"{real_url}generated/arena/", wait_until="networkidle")
    heads = p.locator("#atlas-arena thead th").all_inner_texts()

    def column(title: str) -> list[str]:
        i = heads.index(title) + 1
        return p.locator(f"#atlas-arena tbody td:nth-child({i})").all_inner_texts()

    for title in ("Tokens/s", "Val bpb", "± seeds"):
        for _ in range(2):  # ascending, then descending
            p.locator("#atlas-arena th", has_text=title).first.click()
            cells = column(title)
            values = [float(c.replace(",", "")) for c in cells if c != "—"]
            order = p.locator("#atlas-arena th", has_text=title).first.get_attribute("aria-sort")
            assert values == sorted(values, reverse=order == "descending"), (title, order)
            assert all(c == "—" for c in cells[len(values) :])  # missing values stay last
    assert p.locator("svg.atlas-lines polyline").count() >= 2
    assert page.problems == []


def test_injected_title_shows_as_text_and_runs_no_script(page, xss_url):
    p = page.page
    p.goto(f"{xss_url}generated/works/xss-work/", wait_until="networkidle")
    assert heading(p) == XSS_TITLE
    assert p.title().startswith(XSS_TITLE)
    assert p.locator("article img").count() == 0
    p.goto(f"{xss_url}generated/catalog/", wait_until="networkidle")
    assert XSS_TITLE in p.locator("#atlas-catalog").inner_text()
    results = search(p, "Injected")
    assert any("<script>" in t for t in results.all_inner_texts())
    p.goto(f"{xss_url}generated/errata/", wait_until="networkidle")
    assert p.evaluate("typeof window.__xss") == "undefined"
    assert page.dialogs == []
    assert page.problems == []


# ---------------------------------------------------------------------------- layout

LAYOUT_PAGES = (
    "generated/routers/sinkhorn/",
    "generated/taxonomy/token-choice/",
    "generated/errata/",
    "generated/catalog/",
    "generated/works/switch-transformer/",
    "generated/authors/",
    "generated/arena/",
)
VIEWPORTS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
LAYOUT_CHECK = """
() => {
  const bad = [];
  const root = document.scrollingElement;
  if (root.scrollWidth > root.clientWidth + 1)
    bad.push(`the page scrolls sideways: ${root.scrollWidth} > ${root.clientWidth}`);
  for (const t of document.querySelectorAll('.md-content table:not(.highlighttable)')) {
    if (t.closest('.highlight, .doc-contents')) continue;
    const box = t.closest('.md-typeset__scrollwrap') || t.parentElement;
    const width = t.getBoundingClientRect().width;
    if (width > box.clientWidth + 1) bad.push(`a table is ${width}px wide in a ${box.clientWidth}px box`);
    for (const c of t.querySelectorAll('td, th')) {
      const r = c.getBoundingClientRect();
      if (r.width === 0) continue;  // a filtered-out row
      const text = c.textContent.trim().replace(/\\s+/g, ' ');
      const what = text.slice(0, 50);
      const [sw, cw] = [c.scrollWidth, c.clientWidth];
      if (sw > cw + 1) bad.push(`clipped (${sw} > ${cw}): ${what}`);
      if (text.length > 30 && r.width < 90) bad.push(`a ${Math.round(r.width)}px cell squeezes: ${what}`);
    }
  }
  return bad;
}
"""


@pytest.mark.parametrize("viewport", sorted(VIEWPORTS))
def test_no_table_cell_is_clipped_and_no_overflow_hides_content(browser, real_url, viewport):
    context = browser.new_context(viewport=VIEWPORTS[viewport])
    try:
        page = context.new_page()
        problems = {}
        for path in LAYOUT_PAGES:
            page.goto(real_url + path, wait_until="networkidle")
            found = page.evaluate(LAYOUT_CHECK)
            if found:
                problems[path] = found[:5]
            shot(page, f"layout-{viewport}-{path.strip('/').replace('/', '-')}")
        assert problems == {}
    finally:
        context.close()


def test_a_taxonomy_page_has_one_breadcrumb(page, real_url):
    page.page.goto(real_url + "generated/taxonomy/token-choice/", wait_until="networkidle")
    assert page.page.locator("nav.md-path").count() == 1
    assert page.page.locator(".atlas-crumbs").count() == 0


def test_search_finds_works_by_curated_author_with_readable_previews(page, real_url):
    page.page.goto(real_url, wait_until="networkidle")
    texts = search(page.page, "Fedus").all_inner_texts()
    assert any("Switch Transformers" in t for t in texts), texts
    assert not any("AuthorsWilliam" in t.replace("\n", "") for t in texts), texts


def test_work_page_shows_the_curated_bibliography(page, real_url):
    page.page.goto(real_url + "generated/works/switch-transformer/", wait_until="networkidle")
    meta = page.page.locator("dl.atlas-meta").inner_text()
    assert "William Fedus" in meta and "JMLR 2022" in meta and "github.com/google-research/t5x" in meta
    assert page.page.locator("h2#sources").count() == 1
    page.page.locator("dl.atlas-meta a", has_text="Barret Zoph").click()
    page.page.wait_for_load_state("networkidle")
    assert page.page.url.split("#")[0].endswith("/generated/authors/")
    assert page.page.locator(":target", has_text="Barret Zoph").count() == 1
    assert page.problems == []
