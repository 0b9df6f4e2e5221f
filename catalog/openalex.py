"""The one door to OpenAlex: configuration, requests, retries, rate limits, typed results.

Nothing else in MoE Atlas imports ``pyalex``. pyalex builds every query (filters, OR
filters, select, search, sort); this module sends it with its own ``requests.Session``
so that it can

* point the query at ``OPENALEX_URL`` (a mirror or a local test server): pyalex 0.21 always
  builds ``https://api.openalex.org`` URLs, so scheme and host are rewritten here;
* retry 429/5xx/timeouts with capped, jittered exponential backoff that honours
  ``Retry-After``, and stop at once when the daily budget is spent;
* read OpenAlex's ``X-RateLimit-*`` headers and report the remaining budget;
* see merged ids (a singleton answered with a redirect or with another id).

Configuration (``Settings.from_env()``): ``OPENALEX_API_KEY`` (sent in the
``Authorization`` header, as pyalex does; never logged), ``OPENALEX_EMAIL`` (``From`` header)
and ``OPENALEX_URL``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import pyalex
import requests
from pyalex import Works
from pyalex.api import OpenAlexAuth
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from catalog.openalex_payload import PayloadError, WorkPayload, parse_work, work_id_of

log = logging.getLogger(__name__)

DEFAULT_URL = "https://api.openalex.org"
MAX_IDS_PER_FILTER = 100
"""OpenAlex accepts at most 100 values in one OR filter."""
MAX_PER_PAGE = 100
"""OpenAlex's current largest page."""
WORK_FIELDS = [
    "id",
    "doi",
    "display_name",
    "publication_date",
    "publication_year",
    "type",
    "primary_location",
    "authorships",
    "cited_by_count",
    "counts_by_year",
    "referenced_works",
    "primary_topic",
    "open_access",
    "abstract_inverted_index",
    "is_retracted",
    "updated_date",
]
"""Root-level fields requested with ``select`` (the ones ``WorkPayload`` models)."""
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5


class OpenAlexError(Exception):
    """Base of every error this module raises; messages never contain the API key."""


class ConfigError(OpenAlexError):
    """A bad ``OPENALEX_*`` setting."""


class StopRun(OpenAlexError):
    """Going on would be pointless: OpenAlex is unreachable, the budget is spent or the key is refused."""


class Unreachable(StopRun):
    pass


class BudgetExhausted(StopRun):
    pass


class KeyRejected(StopRun):
    pass


class GaveUp(StopRun):
    """Several requests in a row failed for good (throttled, server errors, broken answers)."""


class WaitTooLong(StopRun):
    """OpenAlex asked to wait longer (``Retry-After``) than the configured maximum."""


class RequestFailed(OpenAlexError):
    """One request failed for good (bad status after retries, malformed body); others may work."""


@dataclass(frozen=True)
class RateLimit:
    """OpenAlex's rate-limit headers of one response (absent headers are ``None``)."""

    limit_usd: float | None = None
    remaining_usd: float | None = None
    cost_usd: float | None = None
    limit: float | None = None
    remaining: float | None = None
    reset_seconds: float | None = None

    _HEADERS: ClassVar[dict[str, str]] = {
        "limit_usd": "X-RateLimit-Limit-USD",
        "remaining_usd": "X-RateLimit-Remaining-USD",
        "cost_usd": "X-RateLimit-Cost-USD",
        "limit": "X-RateLimit-Limit",
        "remaining": "X-RateLimit-Remaining",
        "reset_seconds": "X-RateLimit-Reset",
    }

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RateLimit | None:
        values: dict[str, float] = {}
        for name, header in cls._HEADERS.items():
            raw = headers.get(header)
            if raw is None:
                continue
            try:
                values[name] = float(raw)
            except ValueError:
                log.debug("ignoring unreadable %s header %r", header, raw)
        return cls(**values) if values else None

    def exhausted(self) -> bool:
        """True when the headers say the daily budget cannot pay for another request."""
        if self.remaining_usd is not None:
            return self.remaining_usd <= 0 or (
                self.cost_usd is not None and self.remaining_usd < self.cost_usd
            )
        return self.remaining is not None and self.remaining <= 0

    def describe(self) -> str:
        if self.remaining_usd is not None:
            text = f"${self.remaining_usd:.4f}"
            if self.limit_usd is not None:
                text += f" of ${self.limit_usd:.2f}"
        elif self.remaining is not None:
            text = f"{self.remaining:g}"
            if self.limit is not None:
                text += f" of {self.limit:g}"
        else:
            return "unknown"
        if self.reset_seconds is not None:
            text += f" (resets in {self.reset_seconds / 3600:.1f} h)"
        return text


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Retry schedule: ``attempts`` tries in all; delays grow as base·2ⁿ up to ``cap``, minus jitter."""

    attempts: int = 5
    base: float = 1.0
    cap: float = 60.0
    jitter: float = 0.25
    max_retry_after: float = 300.0
    """Longest ``Retry-After`` (seconds) the client sleeps through; a longer one stops the run."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"Backoff.attempts must be at least 1, got {self.attempts}")
        if self.base < 0 or self.cap < 0 or not 0 <= self.jitter <= 1:
            raise ConfigError(f"bad backoff settings: base={self.base}, cap={self.cap}, jitter={self.jitter}")
        if self.max_retry_after < 0:
            raise ConfigError(f"max_retry_after must be >= 0 seconds, got {self.max_retry_after}")

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        full = min(self.cap, self.base * 2**retry)
        return full * (1 - self.jitter * rng.random())


@dataclass(frozen=True, kw_only=True)
class Settings:
    base_url: str = DEFAULT_URL
    api_key: str | None = field(default=None, repr=False)
    email: str | None = None
    timeout: float = 30.0
    """Seconds one request may take from connecting to the last byte of its body."""
    backoff: Backoff = Backoff()
    give_up_after: int = 3
    """Requests in a row that fail for good (after their retries) before the whole run stops."""

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"OPENALEX_URL must be an http(s) URL with a host, got {self.base_url!r}")
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout}")
        if self.give_up_after < 1:
            raise ConfigError(f"give_up_after must be at least 1, got {self.give_up_after}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``OPENALEX_API_KEY``, ``OPENALEX_EMAIL`` and ``OPENALEX_URL``."""
        env = os.environ if environ is None else environ
        settings = cls(
            base_url=(env.get("OPENALEX_URL") or DEFAULT_URL).rstrip("/"),
            api_key=env.get("OPENALEX_API_KEY") or None,
            email=env.get("OPENALEX_EMAIL") or None,
        )
        return dataclasses.replace(settings, **overrides) if overrides else settings


@dataclass
class RequestStats:
    """HTTP requests sent, by kind (retries count as requests)."""

    singleton: int = 0
    list: int = 0
    search: int = 0
    retries: int = 0
    answered: int = 0
    """Requests that got any HTTP answer (as opposed to a timeout or a refused connection)."""

    @property
    def total(self) -> int:
        return self.singleton + self.list + self.search


@dataclass(frozen=True)
class Lookup:
    """A singleton answer: the work, and the work id asked for when OpenAlex answered with another."""

    work: WorkPayload
    merged_from: str | None = None


@dataclass
class Batch:
    """A list answer for up to 100 ids: parsed works by id, and results that could not be read."""

    works: dict[str, WorkPayload] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)
    """Work id (or ``#index``) -> why the result could not be read."""


class _DeadlineAdapter(HTTPAdapter):
    """A transport adapter that can cut off its open connections, to bound a whole request.

    ``requests`` timeouts bound each socket operation, so a server that drips one byte per
    second holds a request open forever. ``abort()`` shuts down every socket this adapter
    opened; the blocked read then fails at once.
    """

    def __init__(self) -> None:
        # The sockets themselves: http.client drops a connection's reference to its socket
        # while the response (reading the body) still uses it.
        self._live: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        live = self._live

        class Tracked(HTTPConnection):
            def connect(self) -> None:
                super().connect()
                live.add(self.sock)

        class TrackedTLS(HTTPSConnection):
            def connect(self) -> None:
                super().connect()
                live.add(self.sock)

        pools = {
            "http": type("Pool", (HTTPConnectionPool,), {"ConnectionCls": Tracked}),
            "https": type("TLSPool", (HTTPSConnectionPool,), {"ConnectionCls": TrackedTLS}),
        }
        self.poolmanager.pool_classes_by_scheme = pools
        self.poolmanager.key_fn_by_scheme = dict(self.poolmanager.key_fn_by_scheme)

    def abort(self) -> None:
        for sock in list(self._live):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


_BUDGET_WORDS = re.compile(r"budget|credit|quota|daily|per day|midnight", re.IGNORECASE)


class _RedactSecrets(logging.Filter):
    """Removes API keys from records of loggers that print request URLs (urllib3 at DEBUG)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            text = record.getMessage()
            if any(s in text for s in self.secrets):
                for s in self.secrets:
                    text = text.replace(s, "***")
                record.msg, record.args = text, None
        return True


_REDACT = _RedactSecrets()
for _name in ("urllib3", "urllib3.connectionpool"):
    logging.getLogger(_name).addFilter(_REDACT)


def _configure_pyalex(settings: Settings) -> None:
    pyalex.config.api_key = settings.api_key
    pyalex.config.email = settings.email
    pyalex.config.max_retries = 0  # retries happen here, where budget and Retry-After are known
    pyalex.config.user_agent = f"moe-atlas pyalex/{pyalex.__version__}" + (
        f" (mailto:{settings.email})" if settings.email else ""
    )


def _retry_after(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("Retry-After")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_text(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.reason or ""
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or "")[:300]
    return ""


class OpenAlexClient:
    """Typed access to OpenAlex works. One instance per run; not thread-safe.

    ``sleep`` and ``rng`` are injectable so that tests run the retry paths without waiting.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        _configure_pyalex(settings)
        if settings.api_key:
            _REDACT.secrets.add(settings.api_key)
        self._session = session or requests.Session()
        self._adapter = _DeadlineAdapter()
        for prefix in ("http://", "https://"):
            self._session.mount(prefix, self._adapter)
        self._auth = OpenAlexAuth(pyalex.config)
        self._failures_in_a_row = 0
        self._redirected_to: str | None = None
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._key_in_query = False
        self.stats = RequestStats()
        self.rate_limit: RateLimit | None = None
        if not settings.api_key:
            log.warning(
                "OPENALEX_API_KEY is not set: OpenAlex has required a (free) key since February 2026; "
                "without one the daily budget is a few cents per IP (about 100-1,000 calls) and runs "
                "on shared machines soon get HTTP 429. Get a key at https://openalex.org/settings/api"
            )

    # -- queries ------------------------------------------------------------------------------

    def get_work(self, key: str) -> Lookup | None:
        """Singleton lookup (free): ``W123``, ``doi:10.x/y``. ``None`` when OpenAlex has no such work."""
        url = self._with_params(Works(key).url, select=",".join(WORK_FIELDS))
        body = self._get_json(url, "singleton", missing_ok=True)
        if body is None:
            return None
        try:
            work = parse_work(body)
        except PayloadError as exc:
            raise RequestFailed(f"{self._short(url)}: {exc}") from None
        asked = key.upper() if key[:1] in "Ww" and key[1:].isdigit() else None
        if asked is None or work.id == asked:
            return Lookup(work)
        # Another id: fine after a redirect to exactly that id (OpenAlex merged the work).
        if self._redirected_to != work.id:
            where = f"a redirect to {self._redirected_to}" if self._redirected_to else "no redirect"
            raise RequestFailed(f"asked for {asked}, OpenAlex answered with {work.id} ({where})")
        return Lookup(work, merged_from=asked)

    def get_works(self, ids: Sequence[str]) -> Batch:
        """Up to 100 works by id in one list request (an ``openalex_id`` OR filter)."""
        if not 0 < len(ids) <= MAX_IDS_PER_FILTER:
            raise ValueError(f"get_works takes 1..{MAX_IDS_PER_FILTER} ids, got {len(ids)}")
        query = Works().filter_or(openalex_id=list(ids)).select(WORK_FIELDS)
        url = self._with_params(query.url, **{"per-page": MAX_PER_PAGE})
        results = self._results(self._get_json(url, "list"), url)
        batch = Batch()
        asked = set(ids)
        for i, raw in enumerate(results):
            try:
                work = parse_work(raw)
            except PayloadError as exc:
                batch.broken[work_id_of(raw) or f"#{i}"] = str(exc)
                continue
            if work.id not in asked:
                log.warning("ignoring %s in the answer for %d ids: it was not asked for", work.id, len(ids))
                continue
            batch.works[work.id] = work
        return batch

    def search_works(
        self, text: str, years: tuple[int, int] | None = None, per_page: int = 25
    ) -> list[WorkPayload]:
        """Full-text search (billed as search); unreadable results are skipped with a warning."""
        query = Works().search(text)
        if years is not None:
            query = query.filter(publication_year=f"{years[0]}-{years[1]}")
        url = self._with_params(query.select(WORK_FIELDS).url, **{"per-page": per_page})
        return self._parse_all(self._results(self._get_json(url, "search"), url))

    def iter_citing(
        self, ids: Sequence[str], since: str, *, per_page: int = MAX_PER_PAGE, max_results: int | None = None
    ) -> Iterator[WorkPayload]:
        """Works citing any of ``ids`` (≤100) published on or after ``since``, newest first."""
        if not 0 < len(ids) <= MAX_IDS_PER_FILTER:
            raise ValueError(f"iter_citing takes 1..{MAX_IDS_PER_FILTER} ids, got {len(ids)}")
        # filter_or must come first: a later filter_or would merge into an AND filter in pyalex 0.21.
        query = Works().filter_or(cites=list(ids)).filter(from_publication_date=since)
        base = query.sort(publication_date="desc").select(WORK_FIELDS).url
        cursor: str | None = "*"
        seen = 0
        while cursor:
            url = self._with_params(base, **{"per-page": per_page, "cursor": cursor})
            body = self._get_json(url, "list")
            for work in self._parse_all(self._results(body, url)):
                yield work
                seen += 1
                if max_results is not None and seen >= max_results:
                    return
            meta = body.get("meta") if isinstance(body, dict) else None
            cursor = meta.get("next_cursor") if isinstance(meta, dict) else None

    # -- transport ----------------------------------------------------------------------------

    def _with_params(self, url: str, **params: Any) -> str:
        parts = urlsplit(url)
        extra = urlencode(params, safe=",*")  # OpenAlex reads select lists and cursors literally
        query = f"{parts.query}&{extra}" if parts.query else extra
        return self._rebase(urlunsplit((parts.scheme, parts.netloc, parts.path, query, "")))

    def _rebase(self, url: str) -> str:
        """Move a URL built for api.openalex.org onto the configured base URL."""
        base = urlsplit(self.settings.base_url)
        parts = urlsplit(url)
        if parts.netloc == base.netloc and parts.scheme == base.scheme:
            return url
        path = base.path.rstrip("/") + parts.path
        return urlunsplit((base.scheme, base.netloc, path, parts.query, ""))

    def _safe(self, text: str) -> str:
        key = self.settings.api_key
        return text.replace(key, "***") if key else text

    def _short(self, url: str, limit: int = 100) -> str:
        """The URL for messages: without the key, long queries cut (the full URL is logged at DEBUG)."""
        text = self._safe(url)
        return text if len(text) <= limit else text[: limit - 1] + "…"

    def _sendable(self, url: str) -> str:
        if self._key_in_query and self.settings.api_key:
            sep = "&" if urlsplit(url).query else "?"
            return f"{url}{sep}{urlencode({'api_key': self.settings.api_key})}"
        return url

    def _count(self, kind: str) -> None:
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)

    def _send(self, url: str) -> requests.Response:
        """One GET whose whole exchange, body included, ends within ``settings.timeout``."""
        timeout = self.settings.timeout
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            self._adapter.abort()

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            resp = self._session.get(
                self._sendable(url), auth=self._auth, timeout=timeout, allow_redirects=False
            )
        except requests.RequestException:
            if expired.is_set():
                raise requests.Timeout(f"no complete answer within {timeout:g} s") from None
            raise
        finally:
            timer.cancel()
        if expired.is_set():  # a body cut off by the deadline may still look complete
            raise requests.Timeout(f"no complete answer within {timeout:g} s")
        return resp

    def _failed_for_good(self, message: str) -> RequestFailed:
        """Count a request that failed after its retries; too many in a row stop the run."""
        self._failures_in_a_row += 1
        limit = self.settings.give_up_after
        if self._failures_in_a_row >= limit:
            raise GaveUp(
                f"giving up: {limit} requests in a row failed (last: {message}); "
                "OpenAlex is not answering usefully, try again later"
            )
        return RequestFailed(message)

    def _get_json(self, url: str, kind: str, *, missing_ok: bool = False) -> Any:
        """GET ``url`` with retries, following redirects on the configured host; the decoded JSON.

        Retried with backoff: HTTP 429/5xx, timeouts (of the whole request), refused or reset
        connections, bodies cut short or not valid JSON. Stops the run (``StopRun``): a refused
        or missing key (401, 403), a spent budget, a ``Retry-After`` beyond the maximum, no
        answer at all after every attempt, and ``give_up_after`` failed requests in a row.
        """
        backoff = self.settings.backoff
        retry = 0
        redirects = 0
        answered = False
        self._redirected_to = None
        while True:
            self._count(kind)
            log.debug("GET %s", self._safe(url))
            failure: str
            wait: float | None = None
            try:
                resp = self._send(url)
            except requests.Timeout as exc:
                whole = "complete answer" in str(exc)
                failure = str(exc) if whole else f"no answer within {self.settings.timeout:g} s"
            except requests.ConnectionError as exc:
                failure = self._safe(f"connection failed ({_root_cause(exc)})")
            except (
                requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError,
            ) as exc:
                answered = True
                failure = f"answer cut short or undecodable ({_root_cause(exc)})"
            except requests.RequestException as exc:
                failure = self._safe(f"request failed ({type(exc).__name__})")
            else:
                answered = True
                self.stats.answered += 1
                limits = RateLimit.from_headers(resp.headers)
                if limits is not None:
                    self.rate_limit = limits
                status = resp.status_code
                if status == 200:
                    try:
                        body = resp.json()
                    except ValueError as exc:
                        failure = f"malformed JSON ({exc})"
                    else:
                        self._failures_in_a_row = 0
                        return body
                elif status in _REDIRECTS and "Location" in resp.headers:
                    redirects += 1
                    if redirects > _MAX_REDIRECTS:
                        raise self._failed_for_good(f"too many redirects from {self._short(url)}")
                    url = self._rebase(urljoin(url, resp.headers["Location"]))
                    m = re.search(r"/works/(W\d+)$", urlsplit(url).path, re.IGNORECASE)
                    self._redirected_to = m.group(1).upper() if m else None
                    continue
                elif status == 404 and missing_ok:
                    self._failures_in_a_row = 0
                    return None
                elif status == 401 and self.settings.api_key and not self._key_in_query:
                    log.warning("OpenAlex refused the key in the Authorization header; sending it as api_key")
                    self._key_in_query = True
                    continue
                elif status == 401:
                    detail = self._safe(_error_text(resp))
                    if not self.settings.api_key:
                        raise KeyRejected(
                            "OpenAlex asks for an API key (HTTP 401) and OPENALEX_API_KEY is not set; "
                            "get a free key at https://openalex.org/settings/api"
                        )
                    raise KeyRejected(f"OpenAlex rejected the API key (HTTP 401): {detail}".rstrip(": "))
                elif status == 403:
                    detail = self._safe(_error_text(resp))
                    key = "the API key" if self.settings.api_key else "requests without an API key"
                    raise KeyRejected(f"OpenAlex refused {key} (HTTP 403): {detail}".rstrip(": "))
                elif status not in RETRY_STATUSES:
                    raise RequestFailed(
                        f"HTTP {status} from {self._short(url)}: {self._safe(_error_text(resp))}".rstrip(": ")
                    )
                else:
                    wait = _retry_after(resp.headers)
                    text = _error_text(resp)
                    if status == 429 and (
                        (limits is not None and limits.exhausted()) or _BUDGET_WORDS.search(text)
                    ):
                        budget = limits.describe() if limits else "unknown"
                        later = f"; retry after {wait / 3600:.1f} h" if wait else ""
                        said = f": {self._safe(text)}" if text and _BUDGET_WORDS.search(text) else ""
                        raise BudgetExhausted(
                            f"OpenAlex daily budget exhausted (remaining {budget}{later}){said}"
                        )
                    if wait is not None and wait > backoff.max_retry_after:
                        raise WaitTooLong(
                            f"OpenAlex answered HTTP {status} and asks to wait {wait:.0f} s (Retry-After), "
                            f"more than the maximum of {backoff.max_retry_after:g} s (--max-wait); "
                            "run again later"
                        )
                    failure = f"HTTP {status}"
            retry += 1
            if retry >= backoff.attempts:
                where = self._short(url)
                if not answered:
                    host = self.settings.base_url
                    raise Unreachable(
                        f"cannot reach OpenAlex at {host}: {failure} after {backoff.attempts} attempts"
                    )
                raise self._failed_for_good(f"{failure} from {where} after {backoff.attempts} attempts")
            delay = wait if wait is not None else backoff.delay(retry - 1, self._rng)
            self.stats.retries += 1
            log.info("%s for %s; retry %d in %.2f s", failure, self._short(url), retry, delay)
            self._sleep(delay)

    def _results(self, body: Any, url: str) -> list[Any]:
        if not isinstance(body, dict) or not isinstance(body.get("results"), list):
            raise RequestFailed(f"unexpected shape from {self._short(url)}: no 'results' list")
        return body["results"]

    def _parse_all(self, results: list[Any]) -> list[WorkPayload]:
        works = []
        for raw in results:
            try:
                works.append(parse_work(raw))
            except PayloadError as exc:
                log.warning("skipping an unreadable result: %s", exc)
        return works


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a requests connection error, without URLs."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host"
    return type(exc).__name__
