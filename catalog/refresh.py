"""Refreshing the fetched layer from OpenAlex: select works, resolve ids, fetch in batches, store.

Resolution order for each work (how it went is stored as ``resolved_by``):

1. ``ids.openalex`` pinned in the curated file: always wins (``pinned``);
2. the id a previous run resolved, remembered in the fetched record (kept, not looked up again);
3. a singleton lookup of ``ids.doi`` (``doi``), then of the arXiv DOI ``10.48550/arXiv.<id>``
   (``arxiv-doi``); singletons are free and find preprints merged into their published version;
4. a title search with a strict match: normalized titles (near-)equal and years at most one
   apart (``title-search``). Several matching works make the work ``ambiguous``: reported,
   never guessed.

Works with a known id are then fetched with ``openalex_id`` OR filters, 100 ids per request.
An id missing from a batch answer is looked up alone; an answer for another id means OpenAlex
merged the work, and the old id goes to ``merged_from``. Curated files are only read.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import difflib
import html
import logging
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from catalog.errors import CatalogError, Problem
from catalog.fetched_store import (
    dump_record,
    fetched_dir,
    fsync_dir,
    read_checked,
    record_path,
    remove_stale_temp_files,
    same_content,
    write_atomic,
    write_checked,
)
from catalog.loader import read_fetched, read_works
from catalog.models import FetchedRecord, ResolvedBy, Work
from catalog.openalex import (
    MAX_IDS_PER_FILTER,
    OpenAlexClient,
    RateLimit,
    RequestFailed,
    RequestStats,
    StopRun,
)
from catalog.openalex_payload import PayloadError, WorkPayload, parse_work, to_record

log = logging.getLogger(__name__)

Status = Literal["updated", "unchanged", "unresolved", "ambiguous", "failed", "not-fetched"]
STATUSES: tuple[Status, ...] = ("updated", "unchanged", "unresolved", "ambiguous", "failed", "not-fetched")
TITLE_SIMILARITY = 0.95
"""Smallest difflib ratio between normalized titles that counts as the same title."""


@dataclass
class Outcome:
    slug: str
    status: Status
    openalex_id: str | None = None
    resolved_by: ResolvedBy | None = None
    message: str = ""


@dataclass
class PlanItem:
    """What a refresh will do for one work."""

    work: Work
    openalex_id: str | None = None
    resolved_by: ResolvedBy | None = None
    previous: FetchedRecord | None = None

    @property
    def lookups(self) -> list[str]:
        """The lookups resolution would try, in order (empty when the id is known)."""
        if self.openalex_id is not None:
            return []
        steps = []
        if self.work.ids.doi:
            steps.append(f"doi:{self.work.ids.doi}")
        if self.work.ids.arxiv:
            steps.append(f"doi:{arxiv_doi(self.work.ids.arxiv)}")
        if self.work.kind == "paper":  # a model release without a paper has no title to search for
            steps.append("title search")
        return steps

    def describe(self) -> str:
        if self.openalex_id is None:
            steps = self.lookups
            return (
                "resolve by " + ", then ".join(steps) if steps else "nothing to look up (no ids, not a paper)"
            )
        how = "pinned" if self.resolved_by == "pinned" else f"remembered ({self.resolved_by})"
        return f"{how} {self.openalex_id}"


StopKind = Literal["openalex", "write", "interrupted"]


class WriteFailed(Exception):
    """A record could not be written (disk full, permission denied, ...); the run stops."""

    def __init__(self, path: Path, exc: OSError):
        self.path = path
        super().__init__(f"cannot write {path}: {exc.strerror or exc}")


@dataclass
class Summary:
    outcomes: list[Outcome]
    requests: RequestStats
    seconds: float
    resolved: int = 0
    """Ids found by lookups in this run."""
    merged: int = 0
    rate_limit: RateLimit | None = None
    stopped: str | None = None
    """Why the run stopped early (unreachable, budget spent), ``None`` if it ran to the end."""
    stop_kind: StopKind | None = None
    """``openalex`` (OpenAlex unusable), ``write`` (a file could not be written) or ``interrupted``."""

    def count(self, status: Status) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def ok(self) -> bool:
        return self.stopped is None and self.count("failed") == 0


def arxiv_doi(arxiv_id: str) -> str:
    return f"10.48550/arXiv.{arxiv_id}"


def normalize_title(title: str) -> str:
    """Casefolded words of a title: HTML tags and entities, accents' forms and punctuation removed."""
    text = re.sub(r"<[^>]*>", " ", html.unescape(title))
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


def title_matches(work: Work, candidate: WorkPayload) -> bool:
    """Strict match: (near-)equal normalized titles and publication years at most one apart."""
    if candidate.publication_year is None or abs(candidate.publication_year - work.year) > 1:
        return False
    a, b = normalize_title(work.title), normalize_title(candidate.title_text or "")
    return bool(a) and (a == b or difflib.SequenceMatcher(None, a, b).ratio() >= TITLE_SIMILARITY)


def load_works(data_dir: Path) -> list[Work]:
    """Curated works of ``data_dir``; ``CatalogError`` lists every problem."""
    problems: list[Problem] = []
    works = list(read_works(data_dir, problems).values())
    if problems:
        raise CatalogError(problems)
    if not works:
        raise CatalogError([Problem(Path(data_dir) / "works", "no curated works (*.yaml) found")])
    return works


def load_fetched(data_dir: Path) -> dict[str, FetchedRecord]:
    """Stored records by slug; unreadable ones are reported and treated as absent."""
    problems: list[Problem] = []
    records = {r.slug: r for p, r in read_fetched(data_dir, problems).items() if r.slug == p.stem}
    for p in problems:
        log.warning("ignoring a stored record: %s", p)
    return records


def select(
    works: Sequence[Work],
    fetched: dict[str, FetchedRecord],
    checked: dict[str, dt.datetime],
    *,
    slugs: Iterable[str] | None = None,
    older_than_days: float | None = None,
    now: dt.datetime,
) -> list[Work]:
    """The works to refresh: all, or the given slugs, then only those last checked before the cutoff."""
    chosen = list(works)
    if slugs is not None:
        by_slug = {w.slug: w for w in works}
        wanted = list(dict.fromkeys(slugs))
        unknown = [s for s in wanted if s not in by_slug]
        if unknown:
            raise ValueError(f"unknown work slug(s): {', '.join(unknown)}")
        chosen = [by_slug[s] for s in wanted]
    if older_than_days is not None:
        cutoff = now - dt.timedelta(days=older_than_days)

        def last_seen(slug: str) -> dt.datetime | None:
            stamps = [
                t for t in (fetched[slug].fetched_at if slug in fetched else None, checked.get(slug)) if t
            ]
            return max(stamps) if stamps else None

        chosen = [w for w in chosen if (seen := last_seen(w.slug)) is None or seen < cutoff]
    return chosen


def plan(
    works: Sequence[Work], fetched: dict[str, FetchedRecord], *, re_resolve: bool = False
) -> list[PlanItem]:
    items = []
    for w in works:
        prev = fetched.get(w.slug)
        if w.ids.openalex:
            items.append(PlanItem(w, w.ids.openalex, "pinned", prev))
        elif prev is not None and prev.resolved_by != "pinned" and not re_resolve:
            items.append(PlanItem(w, prev.openalex_id, prev.resolved_by, prev))
        else:
            items.append(PlanItem(w, previous=prev))
    return items


def catalog_ids(works: Iterable[Work], fetched: dict[str, FetchedRecord]) -> dict[str, str]:
    """OpenAlex id -> slug for every catalog work with a known id (pinned, stored or merged away)."""
    ids: dict[str, str] = {}
    for w in works:
        rec = fetched.get(w.slug)
        if rec is not None:
            ids.update({m: w.slug for m in rec.merged_from})
            ids[rec.openalex_id] = w.slug
        if w.ids.openalex:
            ids[w.ids.openalex] = w.slug
    return ids


@dataclass
class Refresh:
    """One refresh run over ``data_dir``. Build it, then call ``run()``."""

    data_dir: Path
    client: OpenAlexClient
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    on_done: Callable[[Outcome], None] = lambda outcome: None
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    checked: dict[str, dt.datetime] = field(default_factory=dict)
    resolved: int = 0
    merged: int = 0
    _ids: dict[str, str] = field(default_factory=dict)
    _written: dict[str, FetchedRecord] = field(default_factory=dict)
    _cleaned: bool = False
    _unsynced: bool = False

    def run(
        self, items: Sequence[PlanItem], all_works: Sequence[Work], fetched: dict[str, FetchedRecord]
    ) -> Summary:
        """Resolve, fetch and store ``items``. Every record is written as soon as it is fetched.

        A stop (OpenAlex unusable, a write that fails, Ctrl-C) ends the run early and keeps every
        record already written; the works not reached are ``not-fetched``. Any other exception
        propagates after the same bookkeeping.
        """
        start = time.perf_counter()
        self.checked = read_checked(self.data_dir)
        self._ids = catalog_ids(all_works, fetched)
        stopped: str | None = None
        kind: StopKind | None = None
        try:
            self._fail_shared_ids(items)
            self._resolve_all(
                [i for i in items if i.openalex_id is None and i.work.slug not in self.outcomes]
            )
            self._sync()
            self._fetch_known([i for i in items if i.openalex_id and i.work.slug not in self.outcomes])
        except StopRun as exc:
            stopped, kind = str(exc), "openalex"
            log.error("%s", exc)
        except WriteFailed as exc:
            stopped, kind = str(exc), "write"
            log.error("%s; the records written before it are kept", exc)
        except KeyboardInterrupt:
            stopped, kind = "interrupted (Ctrl-C)", "interrupted"
        finally:
            self._wrap_up(items, stopped)
        return Summary(
            outcomes=[self.outcomes[i.work.slug] for i in items],
            requests=self.client.stats,
            seconds=time.perf_counter() - start,
            resolved=self.resolved,
            merged=self.merged,
            rate_limit=self.client.rate_limit,
            stopped=stopped,
            stop_kind=kind,
        )

    def _wrap_up(self, items: Sequence[PlanItem], stopped: str | None) -> None:
        """Make the written records durable and remember what was checked, whatever happened."""
        with contextlib.suppress(OSError):
            self._sync()
        for item in items:
            if item.work.slug not in self.outcomes:
                self._finish(
                    Outcome(item.work.slug, "not-fetched", item.openalex_id, item.resolved_by, stopped or "")
                )
        if any(o.status in ("updated", "unchanged") for o in self.outcomes.values()):
            try:
                write_checked(self.data_dir, self.checked)
            except OSError as exc:
                log.error(
                    "cannot write %s: %s", fetched_dir(self.data_dir) / "checked.yaml", exc.strerror or exc
                )

    def _fail_shared_ids(self, items: Sequence[PlanItem]) -> None:
        """Works whose known ids coincide cannot both own one record: each fails, naming the other."""
        by_id: dict[str, list[PlanItem]] = {}
        for item in items:
            if item.openalex_id:
                by_id.setdefault(item.openalex_id, []).append(item)
        for wid, group in by_id.items():
            if len(group) > 1:
                slugs = [i.work.slug for i in group]
                for item in group:
                    others = ", ".join(s for s in slugs if s != item.work.slug)
                    why = f"OpenAlex id {wid} is also the id of {others}; two works cannot share one record"
                    self._finish(Outcome(item.work.slug, "failed", wid, item.resolved_by, why))

    # -- resolution ---------------------------------------------------------------------------

    def _resolve_all(self, items: Sequence[PlanItem]) -> None:
        """Resolve each work and store its record at once (a resolution answer is a full record)."""
        resolved_now: list[tuple[PlanItem, WorkPayload]] = []
        for item in items:
            try:
                result = self._resolve(item)
            except RequestFailed as exc:
                self._finish(Outcome(item.work.slug, "failed", message=f"resolution failed: {exc}"))
                continue
            if result is None:
                continue
            self.resolved += 1
            owner = self._ids.get(result.id)
            if owner is not None and owner != item.work.slug:
                self._finish(
                    Outcome(item.work.slug, "failed", result.id, item.resolved_by,
                            f"resolves to {result.id}, which is already the id of {owner}; "
                            "two works cannot share one record (pin the right id or remove the duplicate)")
                )  # fmt: skip
                continue
            self._ids[result.id] = item.work.slug
            self._store(item, result)
            resolved_now.append((item, result))
        # A record stored early may cite works resolved after it: store those again, complete.
        for item, result in resolved_now:
            if self.outcomes[item.work.slug].status == "updated" and self._refs_grew(item, result):
                del self.outcomes[item.work.slug]
                self._store(item, result)

    def _refs_grew(self, item: PlanItem, work: WorkPayload) -> bool:
        """True when the stored record of ``item`` misses catalog works resolved after it."""
        written = self._written.get(item.work.slug)
        if written is None:
            return False
        now = {self._ids[r] for r in written.referenced_works if r in self._ids} - {item.work.slug}
        return sorted(now) != written.referenced_in_catalog

    def _resolve(self, item: PlanItem) -> WorkPayload | None:
        w = item.work
        singles: list[tuple[str, ResolvedBy]] = []
        if w.ids.doi:
            singles.append((f"doi:{w.ids.doi}", "doi"))
        if w.ids.arxiv:
            singles.append((f"doi:{arxiv_doi(w.ids.arxiv)}", "arxiv-doi"))
        for key, how in singles:
            lookup = self.client.get_work(key)
            if lookup is not None:
                return self._resolved(item, lookup.work, how, key)
        if w.kind != "paper":
            self._finish(
                Outcome(w.slug, "unresolved", message=f"{w.kind} without a DOI or arXiv id in OpenAlex")
            )
            return None
        candidates = self.client.search_works(normalize_title(w.title), years=(w.year - 1, w.year + 1))
        matches = list({c.id: c for c in candidates if title_matches(w, c)}.values())
        if len(matches) == 1:
            return self._resolved(item, matches[0], "title-search", "title search")
        if not matches:
            self._finish(
                Outcome(w.slug, "unresolved", message="no DOI/arXiv match and no strict title match")
            )
        else:
            listed = ", ".join(f"{c.id} ({c.publication_year}) {c.title_text!r}" for c in matches)
            self._finish(Outcome(w.slug, "ambiguous", message=f"several works match the title: {listed}"))
        return None

    def _resolved(self, item: PlanItem, work: WorkPayload, how: ResolvedBy, key: str) -> WorkPayload:
        item.openalex_id, item.resolved_by = work.id, how
        log.info("%s: resolved to %s by %s", item.work.slug, work.id, key)
        return work

    # -- batched fetch ------------------------------------------------------------------------

    def _fetch_known(self, items: Sequence[PlanItem]) -> None:
        by_id: dict[str, list[PlanItem]] = {}
        for item in items:
            assert item.openalex_id is not None
            by_id.setdefault(item.openalex_id, []).append(item)
        ids = list(by_id)
        for lo in range(0, len(ids), MAX_IDS_PER_FILTER):
            chunk = ids[lo : lo + MAX_IDS_PER_FILTER]
            try:
                batch = self.client.get_works(chunk)
            except RequestFailed as exc:
                log.warning("a list request for %d works failed: %s", len(chunk), exc)
                for wid in chunk:
                    for item in by_id[wid]:
                        outcome = Outcome(item.work.slug, "failed", wid, item.resolved_by, str(exc))
                        self._finish(outcome, quiet=True)
                continue
            for wid in chunk:
                work: WorkPayload | None = batch.works.get(wid)
                merged_from: str | None = None
                if work is None and wid in batch.broken:
                    self._fail_all(by_id[wid], wid, batch.broken[wid])
                    continue
                if work is None:
                    try:
                        lookup = self.client.get_work(wid)
                    except RequestFailed as exc:
                        self._fail_all(by_id[wid], wid, str(exc))
                        continue
                    if lookup is None:
                        self._fail_all(
                            by_id[wid], wid, f"OpenAlex has no work {wid} (deleted or never existed)"
                        )
                        continue
                    work, merged_from = lookup.work, lookup.merged_from
                    if merged_from:
                        self._note_merge(by_id[wid], merged_from, work.id)
                for item in by_id[wid]:
                    self._store(item, work, merged_from)
            self._sync()

    def _sync(self) -> None:
        if self._unsynced:
            fsync_dir(fetched_dir(self.data_dir))
            self._unsynced = False

    def _note_merge(self, items: Sequence[PlanItem], old: str, new: str) -> None:
        self.merged += len(items)
        for item in items:
            self._ids[new] = item.work.slug
            where = (
                f"; update ids.openalex in works/{item.work.slug}.yaml"
                if item.resolved_by == "pinned"
                else ""
            )
            log.warning("%s: OpenAlex merged %s into %s%s", item.work.slug, old, new, where)

    def _fail_all(self, items: Sequence[PlanItem], wid: str, message: str) -> None:
        for item in items:
            self._finish(Outcome(item.work.slug, "failed", wid, item.resolved_by, message))

    # -- storage ------------------------------------------------------------------------------

    def _store(self, item: PlanItem, work: WorkPayload, merged_from: str | None = None) -> None:
        slug = item.work.slug
        assert item.resolved_by is not None
        prev = item.previous
        merged = list(prev.merged_from) if prev is not None and prev.openalex_id == work.id else []
        if merged_from:
            merged.append(merged_from)
        try:
            record = to_record(
                work,
                slug=slug,
                resolved_by=item.resolved_by,
                fetched_at=self.now,
                merged_from=merged,
                catalog_ids=self._ids,
            )
        except PayloadError as exc:
            self._finish(Outcome(slug, "failed", work.id, item.resolved_by, str(exc)))
            return
        self.checked[slug] = self.now
        if prev is not None and same_content(prev, record):
            self._finish(Outcome(slug, "unchanged", work.id, item.resolved_by))
            return
        path = record_path(self.data_dir, slug)
        try:
            text = dump_record(record)
            text.encode("utf-8")
        except UnicodeEncodeError:
            where = unencodable_field(record.model_dump(mode="json"))
            self._finish(
                Outcome(slug, "failed", work.id, item.resolved_by,
                        f"{work.id} has text that is not valid Unicode (a lone surrogate) in {where}")
            )  # fmt: skip
            return
        try:
            if not self._cleaned:
                fetched_dir(self.data_dir).mkdir(parents=True, exist_ok=True)
                remove_stale_temp_files(fetched_dir(self.data_dir))
                self._cleaned = True
            write_atomic(path, text, sync_dir=False)
        except OSError as exc:
            self.checked.pop(slug, None)
            raise WriteFailed(path, exc) from None
        self._written[slug] = record
        self._unsynced = True
        self._finish(Outcome(slug, "updated", work.id, item.resolved_by))

    def _finish(self, outcome: Outcome, quiet: bool = False) -> None:
        self.outcomes[outcome.slug] = outcome
        if outcome.status in ("failed", "ambiguous") and not quiet:
            log.warning("%s: %s: %s", outcome.slug, outcome.status, outcome.message)
        self.on_done(outcome)


def unencodable_field(data: Any, path: str = "") -> str:
    """The dotted path of the first string in ``data`` that UTF-8 cannot encode."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            return path or "(text)"
        return ""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found = unencodable_field(value, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return ""


def import_payload(
    data_dir: Path, slug: str, payload: Any, *, fetched_at: dt.datetime | None = None
) -> tuple[FetchedRecord, Outcome]:
    """Store a saved OpenAlex work payload as the record of ``slug``, without any request.

    ``resolved_by`` is ``pinned`` when the work pins the payload's id and ``doi`` when the DOIs
    agree; anything else is refused. ``fetched_at`` defaults to the payload's ``updated_date``
    (the capture happened at or after it); a payload without one needs an explicit time.
    """
    works = load_works(data_dir)
    by_slug = {w.slug: w for w in works}
    if slug not in by_slug:
        raise ValueError(f"unknown work slug: {slug}")
    w = by_slug[slug]
    work = parse_work(payload)
    how: ResolvedBy
    if w.ids.openalex == work.id:
        how = "pinned"
    elif w.ids.openalex is None and w.ids.doi and w.ids.doi == work.doi_bare:
        how = "doi"
    else:
        raise ValueError(
            f"payload {work.id} (DOI {work.doi_bare}) does not match work {slug!r} "
            f"(pinned {w.ids.openalex}, DOI {w.ids.doi}); pin the id in works/{slug}.yaml first"
        )
    when = fetched_at or work.updated_date
    if when is None:
        raise ValueError(f"payload {work.id} has no updated_date; give the capture time explicitly")
    fetched = load_fetched(data_dir)
    ids = catalog_ids(works, fetched)
    record = to_record(work, slug=slug, resolved_by=how, fetched_at=when, catalog_ids=ids)
    prev = fetched.get(slug)
    if prev is not None and same_content(prev, record) and prev.fetched_at == record.fetched_at:
        return record, Outcome(slug, "unchanged", work.id, how)
    fetched_dir(data_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(record_path(data_dir, slug), dump_record(record))
    return record, Outcome(slug, "updated", work.id, how)
