"""Storage of the fetched layer: one JSON file per work, written atomically.

``catalog/data/fetched/<slug>.json`` holds one ``FetchedRecord`` in a deterministic form
(sorted keys, two-space indent, UTF-8 without escapes, trailing newline) so that a refresh reads
as a small git diff.

Every write goes to a temporary file in the same directory (``.<slug>.json.<pid>.tmp``, which
the catalog loader never reads), is flushed and fsynced, then renamed over the target with
``os.replace()``, and the directory is fsynced. A run stopped at any moment leaves each record
entirely old or entirely new; temporary files of dead processes are removed by the next run.

A record whose content is unchanged apart from ``fetched_at`` is left untouched, so its
``fetched_at`` keeps saying when that content was fetched. The time each work was last checked
against OpenAlex is kept in ``checked.yaml`` beside the records (slug -> UTC timestamp).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import yaml

from catalog.models import FetchedRecord

log = logging.getLogger(__name__)

CHECKED_FILE = "checked.yaml"
_TEMP_RE = re.compile(r"^\..+\.(\d+)\.[^.]*\.tmp$")


def fetched_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "fetched"


def record_path(data_dir: Path, slug: str) -> Path:
    return fetched_dir(data_dir) / f"{slug}.json"


def dump_record(record: FetchedRecord) -> str:
    """The exact text stored for ``record``."""
    return json.dumps(record.model_dump(mode="json"), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def same_content(a: FetchedRecord, b: FetchedRecord) -> bool:
    """True when two records differ at most in ``fetched_at``."""
    return a.model_dump(exclude={"fetched_at"}) == b.model_dump(exclude={"fetched_at"})


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


NEW_FILE_MODE = 0o644
"""Permission bits of a new record (less the process umask); a replaced file keeps its own."""


def write_atomic(path: Path, text: str | bytes, *, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``text`` (or raw ``bytes``) so that readers see either the old or the
    new file, never a mix.

    The new file gets the permission bits of the file it replaces, or ``NEW_FILE_MODE`` less the
    umask (``0644``) when there was none. Text that is not encodable as UTF-8 (a lone surrogate)
    raises ``UnicodeEncodeError`` before anything is written. With ``sync_dir=False`` the caller
    fsyncs the directory itself (``fsync_dir()``) after a group of writes, which makes the renames
    durable at a fraction of the cost.
    """
    path = Path(path)
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = NEW_FILE_MODE & ~_current_umask()
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if sync_dir:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Delete temporary files left by writers that died (their process id is gone)."""
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _TEMP_RE.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
                log.info("removed %s, left by an interrupted run", p)
    return removed


def read_checked(data_dir: Path) -> dict[str, dt.datetime]:
    """Last check time of each work (UTC); an unreadable file counts as empty, with a warning."""
    path = fetched_dir(data_dir) / CHECKED_FILE
    if not path.exists():
        return {}
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        log.warning("%s: unreadable (%s); treating every work as never checked", path, exc)
        return {}
    if not isinstance(raw, dict):
        log.warning("%s: expected a mapping of slug to timestamp; ignoring it", path)
        return {}
    out = {}
    for slug, value in raw.items():
        try:
            when = value if isinstance(value, dt.datetime) else parse_utc(str(value))
        except ValueError:
            log.warning("%s: ignoring unreadable timestamp %r of %r", path, value, slug)
            continue
        out[str(slug)] = when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
    return out


def parse_utc(text: str) -> dt.datetime:
    """An ISO timestamp; a trailing ``Z`` (which Python 3.10 cannot read) and naive values mean UTC."""
    when = dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def write_checked(data_dir: Path, checked: Mapping[str, dt.datetime]) -> None:
    lines = ["# Last time each work was checked against OpenAlex (UTC); written by scripts/refresh.py.\n"]
    for slug in sorted(checked):
        stamp = checked[slug].astimezone(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        lines.append(f"{slug}: '{stamp}'\n")
    write_atomic(fetched_dir(data_dir) / CHECKED_FILE, "".join(lines))
