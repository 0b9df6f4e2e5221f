"""The page generator on small fixture catalogs, without MkDocs: pages, links, escaping, BibTeX."""

from __future__ import annotations

import datetime as dt
import html
import posixpath
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import bibtexparser
import markdown
import pytest
import yaml
from site_fixtures import LONG_ABSTRACT, REPO, XSS, XSS_TITLE, write_catalog

import catalog
from scripts.sitegen import generate
from scripts.sitegen.bibtex import latex_escape
from scripts.sitegen.routers import (
    Measurement,
    PresetEntry,
    RouterEntry,
    RouterFamily,
    usage_snippets,
)
from scripts.sitegen.svg import load_bars, sparkline, year_chart
from scripts.sitegen.text import href, md, page_url

NOW = dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.timezone.utc)
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
HTML_HREF = re.compile(r'href="([^"]+)"')


def fake_family(**over) -> RouterFamily:
    base = dict(
        name="fake",
        group="token_choice",
        module="impls.routers.token_choice.fake",
        source_rel="impls/routers/token_choice/fake.py",
        source='"""Fake."""\n\nX = "```"  # a backtick run inside the source\n',
        summary="Fake routing: top-1 by argmax.",
        body=(
            "The gate picks $\\arg\\max_e h_e$.\n\n## Usage\n\n"
            "```python\n# a comment\nx = 1 + 1\nassert x == 2\n```"
        ),
        routers=(
            RouterEntry(
                "fake",
                "FakeRouter",
                "impls.routers.token_choice.fake.FakeRouter",
                ("switch-transformer",),
                True,
            ),
        ),
        presets=(
            PresetEntry(
                "fake_base",
                "fake",
                {"k": 1, "drop_policy": "position", "capacity_factor": 1.25},
                128,
                ("switch-transformer", "not-a-catalog-work"),
                "Fake preset after Fedus et al.",
                "none known",
                ("impls.routers.token_choice.fake.FAKE_BASE",),
            ),
        ),
        api_members=("impls.routers.token_choice.fake.FakeRouter",),
        measurements=(
            Measurement("fake", "router", 4, (300.0, 100.0, 0.0, 0.0), 3.0, 0.25, 1.0, 0.61, 0.42),
            Measurement("fake_base", "preset", 128, error="ValueError: <bad> option"),
        ),
    )
    base.update(over)
    return RouterFamily(**base)


@pytest.fixture
def cat(tmp_path: Path) -> catalog.Catalog:
    return catalog.load(write_catalog(tmp_path, xss=True))


@pytest.fixture
def site(tmp_path: Path, cat: catalog.Catalog):
    docs = tmp_path / "docs"
    result = generate(cat, docs, families=[fake_family()], tested_routers={"fake"}, now=NOW)
    return docs, result


def read(docs: Path, rel: str) -> str:
    return (docs / rel).read_text(encoding="utf-8")


def without_code(text: str) -> str:
    """Markdown minus fenced code blocks (their content is shown verbatim, escaped by the highlighter)."""
    return re.sub(r"^(\s*)(`{3,})[^\n]*\n.*?^\1\2\s*$", "", text, flags=re.M | re.S)


def rendered_text(markdown_html: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", markdown_html))


def site_markdown() -> markdown.Markdown:
    """Python-Markdown with exactly the extensions mkdocs.yml enables (snippets aside)."""
    from mkdocs.utils.yaml import get_yaml_loader

    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=get_yaml_loader())
    names, configs = [], {}
    for ext in config["markdown_extensions"]:
        name, opts = next(iter(ext.items())) if isinstance(ext, dict) else (ext, {})
        if name != "pymdownx.snippets":
            names.append(name)
            configs[name] = opts or {}
    return markdown.Markdown(extensions=names, extension_configs=configs)


# ---------------------------------------------------------------------------- pages and links


def test_every_node_and_work_gets_exactly_one_page(site, cat):
    docs, result = site
    pages = {f for f in result.files if f.endswith(".md") and "/_partials/" not in f}
    node_pages = {f for f in pages if f.startswith("generated/taxonomy/")}
    work_pages = {f for f in pages if f.startswith("generated/works/")}
    assert len(node_pages) == len(cat.taxonomy)
    assert work_pages == {f"generated/works/{w.slug}.md" for w in cat.works}
    assert "generated/taxonomy/index.md" in node_pages  # the root is the taxonomy index
    assert {"generated/catalog.md", "generated/errata.md", "generated/routers/index.md"} <= pages
    assert "generated/routers/fake.md" in pages
    assert all((docs / f).is_file() for f in result.files)


def test_markdown_links_point_at_generated_or_hand_written_pages(site):
    docs, result = site
    known = set(result.files) | {"index.md"}
    checked = 0
    for f in result.files:
        if not f.endswith(".md"):
            continue
        base = "index.md" if "/_partials/" in f else f  # partials are included into the home page
        text = without_code(read(docs, f))
        markdown_lines = [ln for ln in text.splitlines() if not ln.startswith("<")]  # raw HTML
        for target in MD_LINK.findall("\n".join(markdown_lines)):
            if target.startswith(("http://", "https://")):
                continue
            if target.startswith("#"):  # an anchor on the page itself
                assert f"{{{target}}}" in text or f'id="{target[1:]}"' in text, f"{f}: no anchor {target}"
                checked += 1
                continue
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(base), target.split("#")[0]))
            assert resolved in known, f"{f}: link {target} -> {resolved} does not exist"
            checked += 1
    assert checked > 50


def test_raw_html_links_in_the_catalog_table_resolve(site, cat):
    docs, result = site
    urls = {page_url(f): f for f in result.files if f.endswith(".md")}
    page = read(docs, "generated/catalog.md")
    base = page_url("generated/catalog.md")
    hrefs = HTML_HREF.findall(page)
    assert len(hrefs) >= len(cat.works)
    for h in hrefs:
        if h.startswith(("https://", "http://")):
            continue  # an official code repository
        url = posixpath.normpath(posixpath.join(base, html.unescape(h))) + "/"
        assert url in urls, f"catalog link {h} resolves to {url}, which no page has"


def test_href_and_page_url_follow_directory_urls():
    assert page_url("index.md") == ""
    assert page_url("generated/taxonomy/index.md") == "generated/taxonomy/"
    assert page_url("generated/works/a.md") == "generated/works/a/"
    assert href("generated/catalog.md", "generated/works/a.md") == "../works/a/"
    assert href("generated/works/a.md", "generated/works/a.md") == "./"
    assert href("index.md", "generated/downloads/x.bib") == "generated/downloads/x.bib"


def test_navigation_mirrors_the_taxonomy_and_lists_router_families(site, cat):
    _, result = site
    nav = result.nav
    assert [next(iter(e)) for e in nav] == ["Home", "Taxonomy", "Catalog", "Routers", "Arena", "Errata"]
    assert nav[2]["Catalog"] == [
        "generated/catalog.md",
        {"Authors": "generated/authors.md"},
        {"What's new": "generated/whats-new.md"},
    ]
    taxonomy = nav[1]["Taxonomy"]
    assert taxonomy[0] == "generated/taxonomy/index.md"
    assert [next(iter(e)) for e in taxonomy[1:]] == ["Algorithm", "System", "Application"]
    assert nav[3]["Routers"] == [
        "generated/routers/index.md",
        {"In transformers and torch.compile": "generated/routers/interop.md"},
        {"Expert parallelism": "generated/routers/expert-parallelism.md"},
        {"Sparse: Token-Choice": [{"fake": "generated/routers/fake.md"}]},
    ]


# ---------------------------------------------------------------------------- work pages


def test_unfetched_work_says_not_yet_fetched(site):
    docs, _ = site
    page = read(docs, "generated/works/shazeer-2017.md")
    assert "not yet fetched from OpenAlex" in page
    assert "References: not known yet" in page
    assert "Cited by:" in page and "switch-transformer.md" in page  # known from other records


def test_fetched_work_shows_authors_citations_trend_and_fetch_date(site):
    docs, _ = site
    page = read(docs, "generated/works/switch-transformer.md")
    names = [page.index(f">{n}</a>") for n in ("William Fedus", "Barret Zoph", "Noam Shazeer")]
    assert names == sorted(names)  # curated authors, in the paper's order, each linked to the index
    assert "1,234 (OpenAlex)" in page
    assert "fetched from OpenAlex on 2026-11-01" in page
    assert "JMLR 2022" in page and "(the survey says ArXiv 2022)" in page
    spark = re.search(r"<svg class=\"atlas-spark\".*?</svg>", page).group(0)
    ET.fromstring(spark)
    assert "2021: 40, 2022: 200, 2023: 0, 2024: 600" in spark
    assert 'href="https://arxiv.org/abs/2101.03961"' in page


def test_abstract_is_a_short_excerpt_only(site):
    docs, _ = site
    page = read(docs, "generated/works/switch-transformer.md")
    assert "THE-END-OF-THE-ABSTRACT-MARKER" not in page
    quote = next(line for line in page.splitlines() if line.startswith("> "))
    shown = rendered_text(site_markdown().convert(quote)).strip()
    assert shown.endswith("…") and len(shown) <= 301
    assert shown.startswith(LONG_ABSTRACT[:60])


def test_work_page_links_its_router_page_and_placements(site):
    docs, _ = site
    page = read(docs, "generated/works/switch-transformer.md")
    assert "](../routers/fake.md)" in page and "`fake_base`" in page
    assert "](../taxonomy/token-choice/index.md)" in page
    assert "No reference implementation yet." in read(docs, "generated/works/fastmoe.md")


def test_errata_page_lists_every_correction_with_its_reason(site, cat):
    docs, _ = site
    page = read(docs, "generated/errata.md")
    total = sum(len(w.errata) for w in cat.works)
    assert f"{total} corrections on 2 works" in page
    assert "A typo in the survey" in page


def test_extension_node_is_marked_with_its_reason(site):
    docs, _ = site
    page = read(docs, "generated/taxonomy/load-balancing/index.md")
    assert '!!! info "Extension node"' in page
    assert "Balancing methods fit no single survey node." in page
    assert "extension</span>" in read(docs, "generated/taxonomy/gating-function/index.md")


def test_node_page_lists_its_works_by_year_with_citations(site):
    docs, _ = site
    page = read(docs, "generated/taxonomy/token-choice/index.md")
    rows = [line for line in page.splitlines() if line.startswith("| 20")]
    years = [int(r.split("|")[1]) for r in rows]
    assert years == sorted(years) and len(rows) == 4
    assert "1,234" in page and "—" in page  # known and unknown citation counts


# ---------------------------------------------------------------------------- router pages


def test_router_page_has_method_presets_papers_measurements_source_and_api(site):
    docs, _ = site
    page = read(docs, "generated/routers/fake.md")
    assert page.startswith('# Fake routing\n\n<p class="atlas-subtitle">top-1 by argmax.</p>')
    assert "\n### Usage\n" in page and "\n# a comment\n" in page  # docstring headings nest under Method
    assert "$\\arg\\max_e h_e$" in page  # docstring Markdown kept as is, math included
    assert "### `fake_base`" in page and "`k=1`" in page and "`drop_policy='position'`" in page
    assert "`capacity_factor=1.25`" in page
    assert "`not-a-catalog-work` (not in the catalog)" in page
    assert "(../works/switch-transformer.md)" in page
    assert "| 3.00 |" in page and "25.0%" in page and '<svg class="atlas-load"' in page
    assert "could not be measured" in page and "&lt;bad&gt; option" in page
    assert (
        '````python linenums="1" title="impls/routers/token_choice/fake.py"' in page
    )  # longer fence than the source's
    assert "::: impls.routers.token_choice.fake.FakeRouter" in page


def test_router_section_is_empty_but_present_without_routers(tmp_path, cat):
    docs = tmp_path / "docs"
    result = generate(cat, docs, families=[], now=NOW)
    assert "No routers are registered yet." in read(docs, "generated/routers/index.md")
    assert result.nav[3]["Routers"] == [
        "generated/routers/index.md",
        {"In transformers and torch.compile": "generated/routers/interop.md"},
        {"Expert parallelism": "generated/routers/expert-parallelism.md"},
    ]
    assert "0 routers" in read(docs, "generated/_partials/home-counts.md")
    page = read(docs, "generated/works/switch-transformer.md")
    assert (
        "no router page documents them yet" in page and "`impls.routers.token_choice.fake.FakeRouter`" in page
    )


def test_usage_snippets_are_the_fenced_python_blocks():
    doc = "Intro.\n\n```python\na = 1\n```\n\n```text\nnot code\n```\n\n    ```py\n    b = 2\n    ```\n"
    assert usage_snippets(doc) == ["a = 1\n", "b = 2\n"]


# ---------------------------------------------------------------------------- home page


def test_home_counts_and_chart(site):
    docs, _ = site
    counts = read(docs, "generated/_partials/home-counts.md")
    assert "**7 works**" in counts and "**11 taxonomy nodes**" in counts and "1 extension" in counts
    assert "**1 router**" in counts and "1 named by the test suite" in counts
    assert "**3 of 7 records fetched**" in counts and "oldest 2026-11-01 (19 days ago)" in counts
    chart = read(docs, "generated/_partials/home-chart.md").split("\n\n")[0]
    svg = ET.fromstring(chart)
    assert svg.find("{http://www.w3.org/2000/svg}title") is not None or "<title>" in chart
    assert "Algorithm (5)" in chart and "System (2)" in chart and "Application (3)" in chart


def test_svg_helpers_make_well_formed_svg():
    for svg in (
        sparkline([(2020, 1), (2021, 5)]),
        year_chart({"a": {2020: 2, 2022: 1}, "b": {2021: 3}}, {"a": "A & B", "b": "<C>"}),
        load_bars([1.0, 0.0, 3.0]),
    ):
        ET.fromstring(svg)
    assert sparkline([]) == ""
    assert year_chart({"a": {2020: 2, 2022: 1}}, {"a": "A"}).count('<rect class="s0"') == 3  # 2 bars + legend


# ---------------------------------------------------------------------------- escaping


@pytest.mark.parametrize(
    "text",
    [
        XSS_TITLE,
        "a *b* _c_ `d` [e](f) $x$ $$y$$ |t| \\ back \\(z\\) \\[w\\]",
        "&lt; literal &amp; entity",
        "1. not a list",
        "# not a heading",
        "x {#id .cls} y",
        "Pangu-∑ ~~del~~ ^sup^ ==mark== :smile:",
        "<!-- comment --> <http://autolink.example>",
    ],
)
def test_markdown_escaping_renders_text_verbatim(text):
    out = site_markdown().convert(md(text))
    assert "<script" not in out and "<img" not in out and "<a " not in out and "arithmatex" not in out
    assert rendered_text(out).strip() == " ".join(text.split())


def test_injected_text_never_reaches_markdown_or_html_as_markup(site):
    docs, result = site
    for f in result.files:
        if f.endswith(".md"):
            text = without_code(read(docs, f))
            assert "<script" not in text and "<img" not in text, f
            assert 'onerror="' not in text, f
    page = read(docs, "generated/works/xss-work.md")
    for part in (
        "Injected",
        "Inj ",
        "Ann ",
        "Bo ",
        "Venue ",
        "Notes ",
        "Says ",
        "Fixed ",
        "Reason ",
        "Topic ",
    ):
        assert part in page
    assert site_markdown().convert(page).count("&lt;script&gt;") >= 9


# ---------------------------------------------------------------------------- downloads


def test_bibtex_file_parses_back_with_one_entry_per_work(site, cat):
    docs, _ = site
    lib = bibtexparser.parse_string(read(docs, "generated/downloads/moe-atlas.bib"))
    assert not lib.failed_blocks
    entries = {e.key: e for e in lib.entries}
    assert set(entries) == {w.slug for w in cat.works}
    for w in cat.works:
        assert entries[w.slug].fields_dict["title"].value == "{" + latex_escape(w.title) + "}"
    assert entries["switch-transformer"].entry_type == "article"
    assert (
        entries["switch-transformer"].fields_dict["author"].value
        == "William Fedus and Barret Zoph and Noam Shazeer"
    )
    assert entries["shazeer-2017"].entry_type == "inproceedings"
    assert entries["shazeer-2017"].fields_dict["eprint"].value == "1701.06538"
    assert entries["dbrx"].entry_type == "misc"
    assert "\\$x\\$" in entries["xss-work"].fields_dict["title"].value


def test_json_export_holds_every_work_and_record(site, cat):
    import json

    docs, _ = site
    data = json.loads(read(docs, "generated/downloads/moe-atlas.json"))
    assert [w["slug"] for w in data["works"]] == [w.slug for w in cat.works]
    assert data["generated_at"].startswith("2026-11-20")
    xss = next(w for w in data["works"] if w["slug"] == "xss-work")
    assert xss["title"] == XSS_TITLE and xss["fetched"]["authors"][0]["name"] == "Author " + XSS


# ---------------------------------------------------------------------------- housekeeping


def test_generation_is_deterministic(tmp_path, cat):
    a, b = tmp_path / "a", tmp_path / "b"
    ra = generate(cat, a, families=[fake_family()], now=NOW)
    rb = generate(cat, b, families=[fake_family()], now=NOW)
    assert ra.files == rb.files
    for f in ra.files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_generator_replaces_its_own_output_but_refuses_a_foreign_folder(tmp_path, cat):
    docs = tmp_path / "docs"
    generate(cat, docs, now=NOW)
    (docs / "generated" / "stale.md").write_text("old")
    generate(cat, docs, now=NOW)
    assert not (docs / "generated" / "stale.md").exists()
    other = tmp_path / "other"
    (other / "generated").mkdir(parents=True)
    (other / "generated" / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not written by the site generator"):
        generate(cat, other, now=NOW)
    assert (other / "generated" / "precious.txt").read_text() == "keep"


def test_a_catalog_with_no_fetched_records_still_generates(tmp_path):
    cat = catalog.load(write_catalog(tmp_path, fetched=False))
    docs = tmp_path / "docs"
    generate(cat, docs)
    assert "nothing fetched yet" in read(docs, "generated/_partials/home-counts.md")
    assert "not yet fetched from OpenAlex" in read(docs, "generated/works/switch-transformer.md")
