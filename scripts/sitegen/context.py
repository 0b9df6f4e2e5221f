"""Where each generated page lives, and the cross-references every page writer needs.

All paths are relative to the docs folder (``site/`` in the repository). Generated pages sit
under ``generated/``; the hand-written home page includes the fragments under
``generated/_partials/``.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field

from catalog import Catalog, FetchedRecord, TaxonomyNode, Work
from scripts.sitegen.routers import RouterFamily

GEN = "generated"
HOME = "index.md"
CATALOG = f"{GEN}/catalog.md"
ERRATA = f"{GEN}/errata.md"
ROUTERS_INDEX = f"{GEN}/routers/index.md"
ROUTERS_INTEROP = f"{GEN}/routers/interop.md"
ROUTERS_PARALLEL = f"{GEN}/routers/expert-parallelism.md"
BIB = f"{GEN}/downloads/moe-atlas.bib"
JSON_EXPORT = f"{GEN}/downloads/moe-atlas.json"
PARTIALS = f"{GEN}/_partials"
AUTHORS = f"{GEN}/authors.md"
WHATS_NEW = f"{GEN}/whats-new.md"
TRACKING = f"{GEN}/tracking.md"
FEED = f"{GEN}/feed.xml"


def author_anchor(name: str) -> str:
    """A stable HTML id for an author on the authors page (ASCII letters, digits and hyphens)."""
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    words = re.sub(r"[^a-z0-9]+", "-", folded).strip("-") or "author"
    return f"author-{words}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def author_sort_key(name: str) -> tuple[str, str]:
    """Sort authors by family name (the last word), then by the whole name."""
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().casefold()
    return (folded.split()[-1] if folded.split() else folded, folded)


def work_doc(slug: str) -> str:
    return f"{GEN}/works/{slug}.md"


TAXONOMY_INDEX = f"{GEN}/taxonomy/index.md"


def node_doc(node: TaxonomyNode) -> str:
    """The root's page is the taxonomy index; every other node has its own folder."""
    return TAXONOMY_INDEX if node.parent is None else f"{GEN}/taxonomy/{node.id}/index.md"


def family_doc(family: str) -> str:
    return f"{GEN}/routers/{family}.md"


@dataclass
class SiteContext:
    """The catalog plus everything derived once and shared by the page writers."""

    cat: Catalog
    families: list[RouterFamily] = field(default_factory=list)
    tested_routers: set[str] = field(default_factory=set)
    arena: list[dict] = field(default_factory=list)
    """Arena run results (``scripts/arena/results/*.json``), for the Arena page and router pages."""
    cited_by: dict[str, list[str]] = field(default_factory=dict)
    """Slug -> slugs of catalog works whose fetched record lists it among its references."""
    branch_of: dict[str, str] = field(default_factory=dict)
    """Node id -> id of its top-level branch (a child of the root); the root maps to itself."""
    impl_family: dict[str, str] = field(default_factory=dict)
    """Dotted import path of a router class or preset -> router family name."""
    impl_policy: dict[str, str] = field(default_factory=dict)
    """Dotted import path of an expert-parallel dispatch policy (``impls.parallel.X``) -> its name."""
    subtree_count: dict[str, int] = field(default_factory=dict)
    """Node id -> number of distinct works placed on it or below it."""
    crumbs_cache: dict[tuple[str, str, bool], str] = field(default_factory=dict)

    @classmethod
    def build(cls, cat: Catalog, families: list[RouterFamily], tested_routers: set[str]) -> SiteContext:
        ctx = cls(cat, families, tested_routers)
        by_target: dict[str, list[str]] = defaultdict(list)
        for w in cat.works:  # chronological, so every list below is too
            rec = cat.fetched_for(w.slug)
            for target in rec.referenced_in_catalog if rec else []:
                if target != w.slug and w.slug not in by_target[target]:
                    by_target[target].append(w.slug)
        ctx.cited_by = dict(by_target)
        tax = cat.taxonomy
        root = tax.root.id
        ctx.branch_of[root] = root
        for nid, depth in tax.walk():
            if depth == 1:
                ctx.branch_of[nid] = nid
            elif depth > 1:
                ctx.branch_of[nid] = ctx.branch_of[tax[nid].parent]  # type: ignore[index]
        for fam in families:
            for r in fam.routers:
                ctx.impl_family[r.path] = fam.name
            for p in fam.presets:
                for path in p.paths:
                    ctx.impl_family[path] = fam.name
        from impls.parallel import POLICIES

        for name, cls in POLICIES.items():
            ctx.impl_policy[f"impls.parallel.{cls.__name__}"] = name
        below: dict[str, set[str]] = defaultdict(set)
        for w in cat.works:
            for nid in w.placements:
                for anc in tax.path(nid):
                    below[anc.id].add(w.slug)
        ctx.subtree_count = {nid: len(below.get(nid, ())) for nid in tax.nodes}
        return ctx

    # ------------------------------------------------------------------ lookups
    def rec(self, slug: str) -> FetchedRecord | None:
        return self.cat.fetched_for(slug)

    def citations(self, slug: str) -> int | None:
        rec = self.cat.fetched_for(slug)
        return rec.cited_by_count if rec is not None else None

    def branches(self, work: Work) -> list[TaxonomyNode]:
        """Top-level branches the work sits under, in survey order."""
        ids = {self.branch_of[n] for n in work.placements}
        return [self.cat.taxonomy[b] for b in self.top_branches() if b in ids]

    def top_branches(self) -> list[str]:
        return [n.id for n in self.cat.taxonomy.children(self.cat.taxonomy.root.id)]

    def families_of(self, work: Work) -> list[str]:
        """Router families implementing a work, from its ``implementations`` and the routers' papers."""
        out = [self.impl_family[p] for p in work.implementations if p in self.impl_family]
        for fam in self.families:
            if work.slug in fam.papers:
                out.append(fam.name)
        return list(dict.fromkeys(out))

    def family(self, name: str) -> RouterFamily:
        return next(f for f in self.families if f.name == name)
