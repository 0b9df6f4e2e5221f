"""The typed catalog: taxonomy tree, curated works and their fetched OpenAlex records."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from catalog.errors import CatalogError, Problem
from catalog.loader import DATA_DIR, locate, read_fetched, read_taxonomy, read_works
from catalog.models import FetchedRecord, TaxonomyNode, Work


@dataclass(frozen=True)
class Taxonomy:
    """The taxonomy tree. Iterating yields nodes depth-first in survey order."""

    nodes: dict[str, TaxonomyNode]
    children_of: dict[str | None, list[str]]

    @classmethod
    def from_nodes(cls, nodes: list[TaxonomyNode]) -> Taxonomy:
        by_id = {n.id: n for n in nodes}
        children: dict[str | None, list[str]] = {}
        for n in sorted(nodes, key=lambda n: n.order):
            children.setdefault(n.parent, []).append(n.id)
        return cls(by_id, children)

    @property
    def root(self) -> TaxonomyNode:
        (root_id,) = self.children_of[None]
        return self.nodes[root_id]

    def __getitem__(self, node_id: str) -> TaxonomyNode:
        return self.nodes[node_id]

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.nodes

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[TaxonomyNode]:
        return (self.nodes[i] for i, _ in self.walk())

    def children(self, node_id: str | None) -> list[TaxonomyNode]:
        """Direct children of a node, in survey order (``None`` gives the root)."""
        return [self.nodes[c] for c in self.children_of.get(node_id, [])]

    def walk(self, node_id: str | None = None) -> Iterator[tuple[str, int]]:
        """Yield ``(node_id, depth)`` depth-first below ``node_id`` (the whole tree by default)."""
        stack = [(c, 0) for c in reversed(self.children_of.get(node_id, []))]
        while stack:
            nid, depth = stack.pop()
            yield nid, depth
            stack.extend((c, depth + 1) for c in reversed(self.children_of.get(nid, [])))

    def descendants(self, node_id: str) -> list[str]:
        return [nid for nid, _ in self.walk(node_id)]

    def path(self, node_id: str) -> list[TaxonomyNode]:
        """Breadcrumb from the root down to ``node_id`` (inclusive)."""
        out = []
        cur: str | None = node_id
        while cur is not None:
            node = self.nodes[cur]
            out.append(node)
            cur = node.parent
        return out[::-1]


@dataclass(frozen=True)
class Catalog:
    """The whole catalog. Build it with ``catalog.load()``.

    Example::

        import catalog
        cat = catalog.load()
        for work in cat.works_under("token-choice", recursive=True):
            print(work.year, work.title, cat.fetched_for(work.slug))
    """

    taxonomy: Taxonomy
    works: list[Work]
    """All works, in chronological order."""
    fetched: dict[str, FetchedRecord]
    """OpenAlex records by work slug; works never fetched are absent."""
    data_dir: Path
    _by_slug: dict[str, Work] = field(repr=False, default_factory=dict)
    _by_node: dict[str, list[Work]] = field(repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._by_slug.update({w.slug: w for w in self.works})
        for w in self.works:
            for node in w.placements:
                self._by_node.setdefault(node, []).append(w)

    def work(self, slug: str) -> Work:
        """The work with this slug; ``KeyError`` naming the slug if there is none."""
        try:
            return self._by_slug[slug]
        except KeyError:
            raise KeyError(f"no work with slug {slug!r}") from None

    def __contains__(self, slug: object) -> bool:
        return slug in self._by_slug

    def fetched_for(self, slug: str) -> FetchedRecord | None:
        """The OpenAlex record of a work, or ``None`` when nobody has fetched it yet."""
        return self.fetched.get(slug)

    def works_under(self, node_id: str, recursive: bool = False) -> list[Work]:
        """Works placed on ``node_id`` (and, if ``recursive``, on any node below it), chronological."""
        if node_id not in self.taxonomy:
            raise KeyError(f"no taxonomy node {node_id!r}")
        ids = [node_id, *(self.taxonomy.descendants(node_id) if recursive else [])]
        seen: dict[str, Work] = {}
        for nid in ids:
            for w in self._by_node.get(nid, []):
                seen.setdefault(w.slug, w)
        return sorted(seen.values(), key=lambda w: w.sort_key)


def check(
    nodes: list[TaxonomyNode],
    works: dict[Path, Work],
    fetched: dict[Path, FetchedRecord],
    taxonomy_path: Path,
    check_imports: bool = False,
    check_placements: bool = True,
) -> list[Problem]:
    """Cross-record checks: identity, tree shape, placements, fetched records, implementation links.

    ``check_placements=False`` (a taxonomy that did not load) skips the tree and placement checks,
    which would only repeat that one problem many times.
    """
    problems: list[Problem] = []
    ids: dict[str, int] = {}
    for i, n in enumerate(nodes):
        if n.id in ids:
            problems.append(Problem(taxonomy_path, f"duplicate node id {n.id!r}", field=f"nodes.{i}.id"))
        ids[n.id] = i
    roots = [n for n in nodes if n.parent is None]
    if len(roots) != 1 and check_placements:
        problems.append(Problem(taxonomy_path, f"expected exactly one root node, found {len(roots)}"))
    parent = {n.id: n.parent for n in nodes}
    for n in nodes:
        if n.parent is not None and n.parent not in parent:
            problems.append(
                Problem(
                    taxonomy_path,
                    f"node {n.id!r} has unknown parent {n.parent!r}",
                    field=f"nodes.{ids[n.id]}.parent",
                )
            )
    for n in nodes:  # cycle detection: walk up at most len(nodes) steps
        cur, steps = n.parent, 0
        while cur is not None and cur in parent and steps <= len(nodes):
            if cur == n.id:
                problems.append(
                    Problem(
                        taxonomy_path,
                        f"node {n.id!r} is its own ancestor (cycle)",
                        field=f"nodes.{ids[n.id]}.parent",
                    )
                )
                break
            cur, steps = parent[cur], steps + 1
    sibling_orders: dict[tuple[str | None, int], str] = {}
    for n in nodes:
        key = (n.parent, n.order)
        if key in sibling_orders:
            problems.append(
                Problem(
                    taxonomy_path,
                    f"nodes {sibling_orders[key]!r} and {n.id!r} share order {n.order} under {n.parent!r}",
                    field=f"nodes.{ids[n.id]}.order",
                )
            )
        sibling_orders[key] = n.id

    seen_slug: dict[str, Path] = {}
    seen_arxiv: dict[str, Path] = {}
    seen_doi: dict[str, Path] = {}
    seen_oa: dict[str, Path] = {}
    seen_ref: dict[int, Path] = {}
    for path, w in works.items():
        for key, table, fname in (
            (w.slug, seen_slug, "slug"),
            (w.ids.arxiv, seen_arxiv, "ids.arxiv"),
            (w.ids.doi, seen_doi, "ids.doi"),
            (w.ids.openalex, seen_oa, "ids.openalex"),
            (w.survey_ref, seen_ref, "survey_ref"),
        ):
            if key is None:
                continue
            if key in table:
                problems.append(Problem(path, f"{key!r} is also used by {table[key].name}", field=fname))
            else:
                table[key] = path
        for j, node in enumerate(w.placements if check_placements else ()):
            if node not in parent:
                problems.append(Problem(path, f"unknown taxonomy node {node!r}", field=f"placements.{j}"))
        if check_imports:
            for j, ref in enumerate(w.implementations):
                err = import_error(ref)
                if err:
                    problems.append(Problem(path, err, field=f"implementations.{j}"))
    owner_of_id = {w.ids.openalex: w.slug for w in works.values() if w.ids.openalex}
    for path, rec in fetched.items():
        owner = owner_of_id.setdefault(rec.openalex_id, rec.slug)
        if owner != rec.slug:
            problems.append(
                Problem(
                    path,
                    f"OpenAlex id {rec.openalex_id} is also the id of work {owner!r}: two works resolve "
                    "to one OpenAlex record (a duplicate work, or a wrong id)",
                    field="openalex_id",
                )
            )
        if rec.slug not in seen_slug:
            problems.append(Problem(path, f"fetched record for unknown work {rec.slug!r}", field="slug"))
        for j, s in enumerate(rec.referenced_in_catalog):
            if s not in seen_slug:
                problems.append(Problem(path, f"unknown work {s!r}", field=f"referenced_in_catalog.{j}"))
    return problems


def import_error(ref: str) -> str | None:
    """``None`` if the dotted path imports, else a message saying why not."""
    module_name, _, attr = ref.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        return f"cannot import module {module_name!r}: {exc}"
    if not hasattr(module, attr):
        return f"module {module_name!r} has no attribute {attr!r}"
    return None


def collect(
    data_dir: Path | str | None = None, check_imports: bool = False
) -> tuple[Catalog | None, list[Problem]]:
    """Read and check everything; return the catalog (``None`` if unusable) and all problems."""
    data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
    problems: list[Problem] = []
    nodes = read_taxonomy(data_dir, problems)
    # A broken taxonomy is reported once: the works' placements are not checked against it.
    taxonomy_ok = not problems
    works = read_works(data_dir, problems)
    fetched = read_fetched(data_dir, problems)
    cross = check(
        nodes,
        works,
        fetched,
        data_dir / "taxonomy.yaml",
        check_imports=check_imports,
        check_placements=taxonomy_ok,
    )
    problems += [locate(p) for p in cross]
    if problems:
        return None, problems
    ordered = sorted(works.values(), key=lambda w: w.sort_key)
    cat = Catalog(Taxonomy.from_nodes(nodes), ordered, {r.slug: r for r in fetched.values()}, data_dir)
    return cat, []


def load(data_dir: Path | str | None = None) -> Catalog:
    """Load the whole typed catalog; raise ``CatalogError`` listing every problem found."""
    cat, problems = collect(data_dir)
    if problems:
        raise CatalogError(problems)
    assert cat is not None
    return cat
