"""Generate the catalog pages, then build the site with MkDocs' Python API.

The generated navigation is handed to MkDocs as a config override (``nav``), so ``mkdocs.yml``
stays hand-written and no generated config file is needed. Builds can run from a private copy
of ``site/`` (``staging``) so that concurrent builds never share ``site/generated``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from catalog import Catalog
from scripts.sitegen.generate import GEN, GeneratedSite, generate
from scripts.sitegen.routers import MeasureSetup, RouterFamily, discover, tested_routers

# Material and MkDocs print a banner about MkDocs 2.0 unless told not to.
os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")
os.environ.setdefault("DISABLE_MKDOCS_2_WARNING", "true")

REPO = Path(__file__).resolve().parents[2]
SITE_SRC = REPO / "site"
MKDOCS_YML = REPO / "mkdocs.yml"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildResult:
    site_dir: Path
    generated: GeneratedSite
    routers_s: float
    """Seconds spent importing, inspecting and measuring the routers."""
    generate_s: float
    mkdocs_s: float


def stage(staging: Path) -> Path:
    """Copy the hand-written sources (``site/`` without ``generated/``) into ``staging``."""
    staging = Path(staging)
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(SITE_SRC, staging, ignore=shutil.ignore_patterns(GEN))
    return staging


def build_site(
    cat: Catalog,
    site_dir: Path,
    docs_dir: Path | None = None,
    *,
    strict: bool = True,
    measure: bool = True,
    families: list[RouterFamily] | None = None,
    setup: MeasureSetup | None = None,
    progress: bool = False,
) -> BuildResult:
    """Write the generated pages into ``docs_dir`` (default ``site/``) and build into ``site_dir``.

    Raises ``mkdocs.exceptions.Abort`` when MkDocs reports a warning under ``strict``.
    """
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    docs_dir = Path(docs_dir) if docs_dir is not None else SITE_SRC
    t0 = time.perf_counter()
    if families is None:
        families = discover(measure=measure, setup=setup)
    tested = tested_routers(families, REPO / "tests")
    t1 = time.perf_counter()
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    from scripts.sitegen.arena import load_results

    generated = generate(
        cat, docs_dir, families, tested, setup=setup, now=now, progress=progress, arena=load_results()
    )
    t2 = time.perf_counter()
    config = load_config(
        str(MKDOCS_YML),
        docs_dir=str(docs_dir),
        site_dir=str(site_dir),
        nav=generated.nav,
        strict=strict,
    )
    config.mdx_configs["pymdownx.snippets"]["base_path"] = [str(docs_dir)]
    cwd = os.getcwd()
    try:
        os.chdir(REPO)  # mkdocstrings resolves its search paths from here
        build(config)
    finally:
        os.chdir(cwd)
    t3 = time.perf_counter()
    log.info("routers %.1f s, generation %.1f s, MkDocs %.1f s", t1 - t0, t2 - t1, t3 - t2)
    return BuildResult(Path(site_dir), generated, t1 - t0, t2 - t1, t3 - t2)
