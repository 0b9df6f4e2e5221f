"""MkDocs hooks: plain ``mkdocs build`` and ``mkdocs serve`` generate the catalog's pages.

``mkdocs.yml`` names this file under ``hooks:``. On every (re)build, ``on_config`` loads the
catalog, inspects and measures the routers, and writes the generated pages with the project's
own generator (``scripts/sitegen``, plain Python, callable without MkDocs), then hands MkDocs the
generated navigation. ``on_serve`` makes ``mkdocs serve`` watch the curated data, the routers
and the generator too, so editing a work's YAML file or a router module reloads the browser.

A build that already passes ``nav`` (``scripts/site.py build``, which generated the pages
itself) is left alone. Environment:

* ``MOE_ATLAS_DATA_DIR``: catalog data folder (default: this checkout's ``catalog/data``);
* ``MOE_ATLAS_MEASURE=0``: skip running the routers for "measured behaviour" (faster reloads).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("mkdocs.hooks.moe_atlas")
WATCHED = ("catalog/data", "catalog", "impls", "scripts/sitegen", "scripts/results", "scripts/arena/results")


def _fresh_imports() -> None:
    """This checkout's packages first on the path (MkDocs restores ``sys.path`` after loading a
    hook), and the project's modules forgotten, so a rebuild under ``mkdocs serve`` sees edits."""
    root = str(ROOT)
    sys.path[:] = [root, *(p for p in sys.path if p != root)]
    for name in list(sys.modules):
        if name.split(".")[0] in ("catalog", "impls") or name.startswith("scripts.sitegen"):
            del sys.modules[name]


def _families(discover, measure: bool):
    """The router families, measured again only when a router source changed.

    Measured times differ from run to run; re-measuring on every rebuild would change the router
    pages every time and make ``mkdocs serve`` rebuild in a loop. The cache lives in a module of
    its own, since MkDocs loads this hook file afresh for every rebuild.
    """
    cache = sys.modules.setdefault("_moe_atlas_hook_cache", types.ModuleType("_moe_atlas_hook_cache"))
    digest = hashlib.sha256(str(measure).encode())
    for path in sorted((ROOT / "impls").rglob("*.py")):
        digest.update(path.read_bytes())
    key = digest.hexdigest()
    if getattr(cache, "key", None) != key:
        cache.families, cache.key = discover(measure=measure), key
    return cache.families


def on_config(config):
    """Generate the pages into the docs folder and set the navigation (skipped if nav is given)."""
    if config.nav is not None:
        return config
    _fresh_imports()
    from mkdocs.exceptions import PluginError

    import catalog
    from scripts.sitegen.arena import load_results
    from scripts.sitegen.generate import generate
    from scripts.sitegen.routers import discover, tested_routers

    data_dir = os.environ.get("MOE_ATLAS_DATA_DIR") or None
    try:
        cat = catalog.load(data_dir)
    except catalog.CatalogError as exc:
        raise PluginError(f"cannot build the site: {exc}") from None
    measure = os.environ.get("MOE_ATLAS_MEASURE", "1") != "0"
    families = _families(discover, measure)
    # No clock in the output: a page that changed on every build would make `mkdocs serve`
    # (which watches the docs folder) rebuild forever. The JSON export is stamped with the
    # newest fetch instead.
    generated = generate(
        cat,
        Path(config.docs_dir),
        families,
        tested_routers(families, ROOT / "tests"),
        site_url=config.site_url or "http://127.0.0.1:8000/",
        arena=load_results(),
    )
    config.nav = generated.nav
    config.mdx_configs["pymdownx.snippets"]["base_path"] = [config.docs_dir]
    log.info("generated %d catalog pages", sum(f.endswith(".md") for f in generated.files))
    return config


def on_serve(server, config, builder):
    """Reload on changes to the catalog data, the routers and the page generator as well."""
    for rel in WATCHED:
        path = ROOT / rel
        if path.exists():
            server.watch(str(path))
    return server
