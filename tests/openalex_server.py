"""An OpenAlex look-alike on a real HTTP server (127.0.0.1), for refresh tests and benchmarks.

:class:`FakeOpenAlex` answers ``/works`` list requests (``openalex_id``/``doi``/``cites`` OR
filters, ``publication_year`` and ``from_publication_date`` filters, ``search``, ``select``,
``sort``, ``per-page``, ``cursor``/``page``) and ``/works/<id|doi:...>`` singletons in OpenAlex's
format, with its quirks: merged ids answer 301 to the surviving work as singletons but are
absent from list results, arXiv DOIs of merged preprints are found only by singletons, select
accepts root fields only, pages hold at most 100, missing works are 404 with an HTML body, and
every answer carries ``X-RateLimit-*`` headers. Faults (status codes, stalls, malformed bodies)
are queued per request kind. Payloads are variants of the real seed record
``openalex_fixtures/W4402351149.json``.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

FIXTURES = Path(__file__).resolve().parent / "openalex_fixtures"
SEED_ID = "W4402351149"
SELECTABLE = {
    "id", "doi", "title", "display_name", "publication_year", "publication_date", "ids", "language",
    "primary_location", "type", "indexed_in", "open_access", "authorships", "institutions",
    "countries_distinct_count", "institutions_distinct_count", "corresponding_author_ids",
    "corresponding_institution_ids", "apc_list", "apc_paid", "fwci", "has_fulltext", "cited_by_count",
    "citation_normalized_percentile", "cited_by_percentile_year", "biblio", "is_retracted",
    "is_paratext", "is_xpac", "primary_topic", "topics", "keywords", "concepts", "mesh",
    "locations_count", "locations", "best_oa_location", "sustainable_development_goals", "awards",
    "funders", "has_content", "content_urls", "referenced_works_count", "referenced_works",
    "related_works", "abstract_inverted_index", "counts_by_year", "updated_date", "created_date",
}  # fmt: skip
COST_USD = {"singleton": 0.0, "list": 0.0001, "search": 0.001}


def seed_payload() -> dict[str, Any]:
    """The real OpenAlex record of "Efficient Routing in Sparse Mixture-of-Experts"."""
    return json.loads((FIXTURES / f"{SEED_ID}.json").read_text(encoding="utf-8"))


def inverted(text: str) -> dict[str, list[int]]:
    index: dict[str, list[int]] = {}
    for pos, word in enumerate(text.split()):
        index.setdefault(word, []).append(pos)
    return index


def make_work(
    n: int,
    title: str,
    *,
    year: int = 2024,
    doi: str | None = None,
    cited_by_count: int = 3,
    counts: dict[int, int] | None = None,
    refs: list[str] = (),  # type: ignore[assignment]
    abstract: str | None = "A routing method for sparse mixtures of experts.",
    updated: str = "2026-03-25T13:04:00.132906",
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A seed-shaped payload for work ``W{n}`` with the given bibliographic facts."""
    w = copy.deepcopy(base if base is not None else seed_payload())
    wid = f"W{n}"
    w["id"] = f"https://openalex.org/{wid}"
    w["ids"] = {"openalex": w["id"]}
    w["doi"] = f"https://doi.org/{doi}" if doi else None
    if doi:
        w["ids"]["doi"] = w["doi"]
    w["title"] = w["display_name"] = title
    w["publication_year"] = year
    w["publication_date"] = f"{year}-06-30"
    w["cited_by_count"] = cited_by_count
    w["counts_by_year"] = [
        {"year": y, "cited_by_count": c} for y, c in sorted((counts or {}).items(), reverse=True)
    ]
    w["referenced_works"] = [f"https://openalex.org/{r}" for r in refs]
    w["abstract_inverted_index"] = inverted(abstract) if abstract else None
    w["updated_date"] = updated
    return w


@dataclass
class Fault:
    kind: str
    """``list``, ``singleton``, ``search`` or ``any``."""
    times: int
    respond: Callable[[Request], Response]
    after: int = 0
    """Matching requests to answer normally before this fault starts."""


@dataclass
class Logged:
    kind: str
    path: str
    args: dict[str, str]
    headers: dict[str, str]


@dataclass
class FakeOpenAlex:
    works: dict[str, dict[str, Any]] = field(default_factory=dict)
    merged: dict[str, str] = field(default_factory=dict)
    doi_alias: dict[str, str] = field(default_factory=dict)
    """Extra DOIs (e.g. arXiv DOIs of merged preprints) only singletons resolve."""
    faults: list[Fault] = field(default_factory=list)
    log: list[Logged] = field(default_factory=list)
    limit_usd: float = 1.0
    remaining_usd: float = 1.0
    required_key: str | None = None
    key_in_query_only: bool = False
    prefix: str = ""
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # -- content ------------------------------------------------------------------------------

    def add(self, *payloads: dict[str, Any]) -> None:
        for p in payloads:
            self.works[p["id"].rsplit("/", 1)[-1]] = p

    def merge(self, old: str, new: str) -> None:
        self.merged[old] = new

    def fail(
        self,
        kind: str,
        status: int,
        *,
        times: int = 1,
        after: int = 0,
        headers: dict[str, str] | None = None,
        body: str = '{"error": "Internal server error"}',
    ) -> None:
        """Answer ``times`` matching requests with ``status`` (after letting ``after`` through)."""
        self.faults.append(Fault(kind, times, lambda req: Response(body, status, headers or {}), after))

    def stall(self, kind: str, seconds: float, *, times: int = 1, after: int = 0) -> None:
        """Answer late (after ``seconds`` or when :attr:`release` is set), then normally."""

        def respond(req: Request) -> Response:
            self.release.wait(seconds)
            return self._answer(req)

        self.faults.append(Fault(kind, times, respond, after))

    def malform(
        self, kind: str, body: str = '{"results": [{"id": "https://openalex.org/W1", ', *, times: int = 1
    ) -> None:
        self.faults.append(
            Fault(kind, times, lambda req: Response(body, 200, {"Content-Type": "application/json"}))
        )

    def cut(self, kind: str, *, times: int = 1) -> None:
        """Answer with a body cut short: the headers promise more bytes than come, then the socket closes."""

        def respond(req: Request) -> Response:
            full = self._answer(req).get_data()

            def body() -> Iterator[bytes]:
                yield full[: len(full) // 2]
                raise ConnectionAbortedError("cut mid-body on purpose")

            headers = {"Content-Type": "application/json", "Content-Length": str(len(full))}
            return Response(body(), 200, headers, direct_passthrough=True)

        self.faults.append(Fault(kind, times, respond))

    def drip(self, kind: str, *, every: float = 0.5, times: int = 1) -> None:
        """Answer one byte every ``every`` seconds (all at once when :attr:`release` is set)."""

        def respond(req: Request) -> Response:
            full = self._answer(req).get_data()

            def body() -> Iterator[bytes]:
                for i in range(len(full)):
                    if not self.release.is_set():
                        self.release.wait(every)
                    yield full[i : i + 1]

            headers = {"Content-Type": "application/json", "Content-Length": str(len(full))}
            return Response(body(), 200, headers, direct_passthrough=True)

        self.faults.append(Fault(kind, times, respond))

    def requests_of(self, kind: str) -> list[Logged]:
        return [r for r in self.log if r.kind == kind]

    # -- HTTP ---------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        path = request.path
        if self.prefix:
            if not path.startswith(self.prefix):
                return Response("not found", 404)
            path = path[len(self.prefix) :]
        kind = (
            "singleton" if path.startswith("/works/") else ("search" if "search" in request.args else "list")
        )
        with self.lock:
            self.log.append(Logged(kind, path, dict(request.args), dict(request.headers)))
            fault = None
            for f in self.faults:
                if f.kind in (kind, "any") and f.times > 0:
                    if f.after > 0:
                        f.after -= 1
                        continue
                    f.times -= 1
                    fault = f
                    break
        if self.required_key is not None:
            header_ok = request.headers.get("Authorization") == f"Bearer {self.required_key}"
            query_ok = request.args.get("api_key") == self.required_key
            if not (query_ok or (header_ok and not self.key_in_query_only)):
                return self._json({"error": "Invalid API key", "message": "Pass a valid api_key"}, 401, kind)
        if fault is not None:
            return fault.respond(request)
        return self._answer(request, path, kind)

    def _answer(self, request: Request, path: str | None = None, kind: str | None = None) -> Response:
        path = path if path is not None else request.path[len(self.prefix) :]
        kind = kind or ("singleton" if path.startswith("/works/") else "list")
        select = request.args.get("select")
        fields = select.split(",") if select else None
        if fields and (bad := [f for f in fields if f not in SELECTABLE]):
            return self._bad_request(f"{bad[0]} is not a valid select field.", kind)
        if len(request.url) > 4096:
            return Response("URI Too Long", 414)
        if path.startswith("/works/"):
            return self._singleton(path[len("/works/") :], fields)
        if path != "/works":
            return Response("<html>not found</html>", 404, {"Content-Type": "text/html"})
        return self._list(request, fields, kind)

    def _singleton(self, key: str, fields: list[str] | None) -> Response:
        wid = key.removeprefix("https://openalex.org/").upper()
        if wid in self.merged:
            return Response("", 301, {"Location": f"https://api.openalex.org/works/{self.merged[wid]}"})
        if wid not in self.works:
            doi = re.sub(r"^(doi:|https?://doi\.org/)", "", key, flags=re.IGNORECASE).lower()
            aliases = {k.lower(): v for k, v in self.doi_alias.items()}
            wid = aliases.get(doi) or next(
                (i for i, w in self.works.items() if (w.get("doi") or "").lower().endswith("doi.org/" + doi)),
                "",
            )
        if wid not in self.works:
            return Response("<html><body>404 Not Found</body></html>", 404, {"Content-Type": "text/html"})
        return self._json(self._select(self.works[wid], fields), 200, "singleton")

    def _list(self, request: Request, fields: list[str] | None, kind: str) -> Response:
        per_page = int(request.args.get("per-page", request.args.get("per_page", 25)))
        if not 1 <= per_page <= 100:
            return self._bad_request("per-page must be between 1 and 100", kind)
        hits = list(self.works.values())
        for part in filter(None, request.args.get("filter", "").split(",")):
            name, _, value = part.partition(":")
            hits = [w for w in hits if self._keep(w, name, value)]
            if name not in ("openalex_id", "doi", "cites", "publication_year", "from_publication_date"):
                return self._bad_request(f"{name} is not a valid filter field", kind)
        if "search" in request.args:
            words = request.args["search"].lower().split()
            hits = [w for w in hits if all(x in (w.get("display_name") or "").lower() for x in words)]
        if request.args.get("sort") == "publication_date:desc":
            hits.sort(key=lambda w: w.get("publication_date") or "", reverse=True)
        else:  # OpenAlex's order is its own, not the order of the ids asked for
            hits.sort(key=lambda w: w["id"], reverse=True)
        cursor = request.args.get("cursor")
        start = 0 if cursor in (None, "*") else int(cursor)
        if cursor is None:
            start = (int(request.args.get("page", 1)) - 1) * per_page
        page = hits[start : start + per_page]
        more = start + per_page < len(hits)
        meta = {
            "count": len(hits),
            "db_response_time_ms": 3,
            "page": None if cursor else start // per_page + 1,
            "per_page": per_page,
            "next_cursor": str(start + per_page) if cursor and more else None,
            "groups_count": None,
        }
        body = {"meta": meta, "results": [self._select(w, fields) for w in page], "group_by": []}
        return self._json(body, 200, kind)

    def _keep(self, w: dict[str, Any], name: str, value: str) -> bool:
        values = value.split("|")
        if name == "openalex_id":
            return w["id"].rsplit("/", 1)[-1] in {
                v.removeprefix("https://openalex.org/").upper() for v in values
            }
        if name == "doi":
            return (w.get("doi") or "").lower().removeprefix("https://doi.org/") in {
                v.lower() for v in values
            }
        if name == "cites":
            refs = {r.rsplit("/", 1)[-1] for r in w.get("referenced_works") or []}
            return bool(refs & set(values))
        if name == "publication_year":
            lo, _, hi = value.partition("-")
            return int(lo) <= (w.get("publication_year") or 0) <= int(hi or lo)
        if name == "from_publication_date":
            return (w.get("publication_date") or "") >= value
        return True

    @staticmethod
    def _select(w: dict[str, Any], fields: list[str] | None) -> dict[str, Any]:
        return {k: v for k, v in w.items() if k in fields} if fields else w

    def _bad_request(self, message: str, kind: str) -> Response:
        return self._json({"error": "Invalid query parameters error.", "message": message}, 400, kind)

    def _json(self, body: Any, status: int, kind: str) -> Response:
        with self.lock:
            cost = COST_USD.get(kind, 0.0) if status == 200 else 0.0
            self.remaining_usd = max(0.0, self.remaining_usd - cost)
            headers = {
                "Content-Type": "application/json",
                "X-RateLimit-Limit-USD": f"{self.limit_usd}",
                "X-RateLimit-Remaining-USD": f"{self.remaining_usd:.6f}",
                "X-RateLimit-Cost-USD": f"{cost}",
                "X-RateLimit-Reset": "3600",
            }
        try:
            text = json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: legal JSON only as a \\u escape
            text = json.dumps(body, ensure_ascii=True).encode("ascii")
        return Response(text, status, headers)


class _Shared:
    """One server per process (starting and stopping one costs about half a second)."""

    server: HTTPServer | None = None
    current: FakeOpenAlex | None = None


def _dispatch(request: Request) -> Response:
    fake = _Shared.current
    if fake is None:
        return Response("no OpenAlex look-alike is being served", 503)
    return fake.handle(request)


@contextlib.contextmanager
def serve(fake: FakeOpenAlex) -> Iterator[str]:
    """Serve ``fake`` on 127.0.0.1 (a free port, one thread per request); yields the base URL."""
    if _Shared.server is None:
        server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
        server.expect_request(re.compile(".*")).respond_with_handler(_dispatch)
        server.start()
        atexit.register(server.stop)
        _Shared.server = server
    _Shared.current = fake
    try:
        yield f"http://127.0.0.1:{_Shared.server.port}{fake.prefix}"
    finally:
        fake.release.set()
        _Shared.current = None


def write_catalog(data_dir: Path, works: list[dict[str, Any]]) -> Path:
    """A small curated catalog: a two-node taxonomy and one YAML file per work."""
    (data_dir / "works").mkdir(parents=True, exist_ok=True)
    taxonomy = {
        "nodes": [
            {"id": "moe", "title": "Mixture of Experts", "order": 0},
            {"id": "gating", "title": "Gating Function", "parent": "moe", "order": 0},
        ]
    }
    (data_dir / "taxonomy.yaml").write_text(yaml.safe_dump(taxonomy, sort_keys=False), encoding="utf-8")
    for w in works:
        doc = {"title": "Untitled", "year": 2024, "placements": ["gating"], "provenance": "tracked", **w}
        path = data_dir / "works" / f"{w['slug']}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return data_dir


@pytest.fixture
def fake_openalex() -> FakeOpenAlex:
    return FakeOpenAlex()


@pytest.fixture
def openalex_url(fake_openalex: FakeOpenAlex, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A running fake OpenAlex; ``OPENALEX_URL`` points at it and no real key leaks in."""
    with serve(fake_openalex) as url:
        monkeypatch.setenv("OPENALEX_URL", url)
        monkeypatch.delenv("OPENALEX_API_KEY", raising=False)
        monkeypatch.delenv("OPENALEX_EMAIL", raising=False)
        yield url
