"""The MoE Atlas site generator: catalog and routers in, Markdown pages and navigation out.

>>> import catalog
>>> from scripts.sitegen import generate
>>> site = generate(catalog.load(), docs_dir=Path("site"))      # doctest: +SKIP
>>> site.nav[0]                                                  # doctest: +SKIP
{'Home': 'index.md'}

Modules: ``text`` (escaping, links), ``svg`` (inline
charts), ``bibtex``, ``routers`` (router families and
their measured behaviour), ``pages_*`` (one module per kind of page),
``generate`` (writes everything) and ``build`` (MkDocs).
"""

from scripts.sitegen.generate import GeneratedSite, generate
from scripts.sitegen.routers import MeasureSetup, RouterFamily, discover, usage_snippets

__all__ = [
    "GeneratedSite",
    "MeasureSetup",
    "RouterFamily",
    "discover",
    "generate",
    "usage_snippets",
]
