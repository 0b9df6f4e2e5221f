"""The refresh and the other scripts under every fault that used to end in a traceback or lost work.

Each test names the failure mode it pins. A real HTTP server on 127.0.0.1 plays OpenAlex
(``openalex_server.FakeOpenAlex``); the catalogs are temporary copies.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openalex_server import make_work, write_catalog
from refresh_helpers import REFRESH_SCRIPT, REPO, pinned_catalog, record, refresh, small_catalog, snapshot

import catalog
import catalog.fetched_store as store
from catalog.models import FetchedRecord
from catalog.openalex_payload import MAX_ABSTRACT_CHARS, MAX_TEXT_CHARS

SCRIPTS = REPO / "scripts"


def env_for(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENALEX_")}
    env.update(OPENALEX_URL=url, PYTHONUNBUFFERED="1", **extra)
    return env


def records_in(data: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((data / "fetched").glob("*.json"))}


def doi_catalog(data: Path, fake, n: int, start: int = 2000) -> Path:
    """``n`` works resolved by DOI singletons (one request each), answered by the fake."""
    works = []
    for i in range(n):
        wid = start + i
        fake.add(make_work(wid, f"Routing study {wid}", doi=f"10.5555/rs.{wid}"))
        works.append(
            {"slug": f"rs-{wid}", "title": f"Routing study {wid}", "ids": {"doi": f"10.5555/rs.{wid}"}}
        )
    return write_catalog(data, works)


def validate(data: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_script(str(SCRIPTS / "validate.py"), "--no-imports", "--data-dir", str(data), cwd=cwd)


def run_script(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# -- 1. scripts act on the checkout they sit in ----------------------------------------------


def _copy_checkout(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", ".venv", "public", "site", "artifacts", "__pycache__", "*.pyc")
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def test_scripts_read_and_write_the_data_of_their_own_checkout(tmp_path):
    copy = _copy_checkout(tmp_path / "copy")
    payload = json.loads((REPO / "tests/openalex_fixtures/W4402351149.json").read_text(encoding="utf-8"))
    payload["cited_by_count"] += 1000
    saved = tmp_path / "payload.json"
    saved.write_text(json.dumps(payload), encoding="utf-8")
    original = snapshot(REPO / "catalog" / "data")
    # Another importable checkout first on the path: the script must still use its own.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_script(
        str(copy / "scripts/refresh.py"),
        "--import-payload", "efficient-routing-sparse-moe", str(saved),
        cwd=elsewhere, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        json.loads((copy / "catalog/data/fetched/efficient-routing-sparse-moe.json").read_text())[
            "cited_by_count"
        ]
        == payload["cited_by_count"]
    )
    assert snapshot(REPO / "catalog" / "data") == original
    proc = run_script(str(copy / "scripts/validate.py"), "--no-imports", cwd=elsewhere, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"catalog OK: {copy / 'catalog' / 'data'}" in proc.stdout
    probe = "import _checkout, catalog, impls; print(catalog.__file__); print(impls.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=copy / "scripts",
        env=env,
        check=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(copy) for p in out), out


# -- 2. transport errors are retried ---------------------------------------------------------


def test_a_body_cut_short_is_retried_like_a_timeout(tmp_path, fake_openalex, openalex_url, caplog):
    data = small_catalog(tmp_path, fake_openalex)
    fake_openalex.cut("list")
    caplog.set_level(logging.INFO, "catalog.openalex")
    assert refresh(data) == 0
    assert len(fake_openalex.requests_of("list")) == 2
    assert "answer cut short" in caplog.text


def test_bodies_cut_short_every_time_fail_their_batch_per_batch(
    tmp_path, fake_openalex, openalex_url, caplog
):
    data = pinned_catalog(tmp_path, fake_openalex, 150)
    fake_openalex.cut("list", times=3)
    assert refresh(data, "--attempts", "3", "--backoff", "0") == 1
    assert len(records_in(data)) == 50
    assert "a list request for 100 works failed: answer cut short" in caplog.text


# -- 3. nothing fetched is thrown away --------------------------------------------------------


def test_a_stop_during_resolution_keeps_every_work_already_resolved(tmp_path, fake_openalex, openalex_url):
    data = doi_catalog(tmp_path, fake_openalex, 6)
    spent = {"X-RateLimit-Remaining-USD": "0", "X-RateLimit-Limit-USD": "1"}
    fake_openalex.fail("singleton", 429, after=4, headers=spent)
    assert refresh(data) == 3
    assert sorted(records_in(data)) == [f"rs-{2000 + i}.json" for i in range(4)]
    for i in range(4):
        assert record(data, f"rs-{2000 + i}").resolved_by == "doi"
    catalog.load(data)


def test_a_crash_during_resolution_keeps_what_was_resolved_and_says_one_line(
    tmp_path, fake_openalex, openalex_url, monkeypatch, caplog
):
    data = doi_catalog(tmp_path, fake_openalex, 5)
    from catalog.openalex import OpenAlexClient

    real = OpenAlexClient.get_work
    calls = {"n": 0}

    def crashing(self, key):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated bug")
        return real(self, key)

    monkeypatch.setattr(OpenAlexClient, "get_work", crashing)
    assert refresh(data) == 1
    assert len(records_in(data)) == 3
    (line,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "unexpected error: RuntimeError: simulated bug" in line.getMessage()
    assert line.exc_info is None


def test_ctrl_c_prints_one_line_keeps_records_and_exits_130(tmp_path, fake_openalex, openalex_url):
    data = doi_catalog(tmp_path, fake_openalex, 8)
    fake_openalex.stall("singleton", 60.0, after=3)
    proc = subprocess.Popen(
        [sys.executable, str(REFRESH_SCRIPT), "--data-dir", str(data)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for(openalex_url), cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while len(fake_openalex.requests_of("singleton")) < 4:
            assert time.monotonic() < deadline, "the refresh never reached the stalled request"
            time.sleep(0.02)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        fake_openalex.release.set()
    assert proc.returncode == 130
    assert_no_traceback(err)
    lines = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 1 and "interrupted (Ctrl-C)" in lines[0], err
    assert len(records_in(data)) == 3
    catalog.load(data)


# -- 4. run-level give-up ----------------------------------------------------------------------


def test_a_server_that_keeps_failing_ends_the_run_after_a_few_requests(
    tmp_path, fake_openalex, openalex_url, capsys
):
    data = doi_catalog(tmp_path, fake_openalex, 40)
    fake_openalex.fail("any", 503, times=10_000)
    sleeps: list[float] = []
    assert refresh(data, "--attempts", "2", sleeps=sleeps) == 3
    assert len(fake_openalex.log) == 3 * 2  # 3 requests in a row, 2 attempts each, then stop
    err = capsys.readouterr().err
    assert "giving up: 3 requests in a row failed" in err
    assert_no_traceback(err)
    assert records_in(data) == {}


def test_403_stops_at_once(tmp_path, fake_openalex, openalex_url, capsys):
    data = doi_catalog(tmp_path, fake_openalex, 5)
    fake_openalex.fail("any", 403, times=100, body='{"error": "Forbidden", "message": "rate limit exceeded"}')
    assert refresh(data) == 3
    assert len(fake_openalex.log) == 1
    assert "refused requests without an API key (HTTP 403)" in capsys.readouterr().err


def test_401_without_a_key_says_that_no_key_is_set(tmp_path, fake_openalex, openalex_url, capsys):
    data = doi_catalog(tmp_path, fake_openalex, 2)
    fake_openalex.required_key = "the-key"
    assert refresh(data) == 3
    assert "OPENALEX_API_KEY is not set" in capsys.readouterr().err


# -- 5. time is bounded -------------------------------------------------------------------------


def test_timeout_bounds_a_whole_request_against_a_dripping_server(tmp_path, fake_openalex, openalex_url):
    data = small_catalog(tmp_path, fake_openalex)
    fake_openalex.drip("list", every=0.5)  # ~2 bytes a second: hours for one answer
    start = time.monotonic()
    assert refresh(data, "--timeout", "1") == 0
    assert time.monotonic() - start < 8
    assert len(fake_openalex.requests_of("list")) == 2
    assert len(records_in(data)) == 4


def test_a_retry_after_beyond_the_maximum_stops_instead_of_sleeping(
    tmp_path, fake_openalex, openalex_url, capsys
):
    data = small_catalog(tmp_path, fake_openalex)
    fake_openalex.fail("list", 503, headers={"Retry-After": "900"})
    sleeps: list[float] = []
    assert refresh(data, "--max-wait", "60", sleeps=sleeps) == 3
    assert sleeps == []
    assert "asks to wait 900 s (Retry-After), more than the maximum of 60 s" in capsys.readouterr().err


def test_a_spent_budget_is_recognised_from_the_body_alone(tmp_path, fake_openalex, openalex_url, capsys):
    data = pinned_catalog(tmp_path, fake_openalex, 3)
    body = '{"error": "Too Many Requests", "message": "You have used up your daily budget of $1.00."}'
    fake_openalex.fail("list", 429, body=body)
    sleeps: list[float] = []
    assert refresh(data, sleeps=sleeps) == 3
    assert sleeps == [] and len(fake_openalex.log) == 1
    assert "daily budget exhausted" in capsys.readouterr().err


# -- 6. one bad record never aborts a run -------------------------------------------------------


def test_a_lone_surrogate_fails_only_its_work(tmp_path, fake_openalex, openalex_url, caplog):
    data = pinned_catalog(tmp_path, fake_openalex, 3)
    fake_openalex.works["W1001"]["authorships"][0]["author"]["display_name"] = "Broken \ud800 Name"
    assert refresh(data) == 1
    assert sorted(records_in(data)) == ["work-1000.json", "work-1002.json"]
    assert (
        "work-1001: failed: W1001 has text that is not valid Unicode (a lone surrogate) in authors.0.name"
        in (caplog.text)
    )


def test_oversized_fields_are_capped_at_the_documented_size(tmp_path, fake_openalex, openalex_url, caplog):
    data = pinned_catalog(tmp_path, fake_openalex, 2)
    fake_openalex.works["W1000"]["abstract_inverted_index"] = {f"w{i}": [i] for i in range(20_000)}
    fake_openalex.works["W1001"]["display_name"] = "Long " * 2_000
    assert refresh(data) == 0
    abstract = record(data, "work-1000").abstract
    title = record(data, "work-1001").title
    assert abstract is not None and len(abstract) <= MAX_ABSTRACT_CHARS and abstract.endswith("…")
    assert len(title) <= MAX_TEXT_CHARS and title.endswith("…")
    assert "the abstract has" in caplog.text and "the title has" in caplog.text


def test_an_answer_for_another_id_fails_that_work_and_the_run_goes_on(
    tmp_path, fake_openalex, openalex_url, capsys
):
    data = pinned_catalog(tmp_path, fake_openalex, 3)
    impostor = fake_openalex.works["W1002"]
    del fake_openalex.works["W1001"]  # absent from the list answer, so looked up alone, where ...
    original = fake_openalex._singleton

    def wrong_singleton(key, fields):  # ... OpenAlex answers 200 with another work, no redirect
        if key.upper() == "W1001":
            return fake_openalex._json(fake_openalex._select(impostor, fields), 200, "singleton")
        return original(key, fields)

    fake_openalex._singleton = wrong_singleton
    assert refresh(data) == 1
    assert sorted(records_in(data)) == ["work-1000.json", "work-1002.json"]
    assert "asked for W1001, OpenAlex answered with W1002" in capsys.readouterr().out


def test_two_works_resolving_to_one_id_are_reported_by_refresh_and_validate(
    tmp_path, fake_openalex, openalex_url, capsys
):
    fake_openalex.add(make_work(3000, "Shared routing record", doi="10.5555/shared"))
    works = [
        {"slug": "first", "title": "Shared routing record", "ids": {"doi": "10.5555/shared"}},
        {"slug": "second", "title": "Shared routing record", "ids": {"arxiv": "2401.00001"}},
    ]
    fake_openalex.doi_alias["10.48550/arXiv.2401.00001"] = "W3000"
    data = write_catalog(tmp_path, works)
    assert refresh(data) == 1
    assert sorted(records_in(data)) == ["first.json"]
    assert "resolves to W3000, which is already the id of first" in capsys.readouterr().out
    # A second copy of the record under the other slug: validate names both.
    text = (
        (data / "fetched" / "first.json")
        .read_text(encoding="utf-8")
        .replace('"slug": "first"', '"slug": "second"')
    )
    (data / "fetched" / "second.json").write_text(text, encoding="utf-8")
    proc = validate(data, tmp_path)
    assert proc.returncode == 1
    assert "OpenAlex id W3000 is also the id of work 'first'" in proc.stdout


# -- 7. OS errors are clear ---------------------------------------------------------------------


def test_disk_full_stops_with_one_line_naming_the_file_and_keeps_old_records(
    tmp_path, fake_openalex, openalex_url, monkeypatch, capsys
):
    data = pinned_catalog(tmp_path, fake_openalex, 3)
    assert refresh(data) == 0
    old = records_in(data)
    for w in fake_openalex.works.values():
        w["cited_by_count"] += 10
    calls = {"n": 0}
    real_replace = os.replace

    def failing_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", failing_replace)
    assert refresh(data) == 4
    err = capsys.readouterr().err
    assert f"cannot write {data / 'fetched' / 'work-1001.json'}: No space left on device" in err
    assert_no_traceback(err)
    now = records_in(data)
    assert now["work-1001.json"] == old["work-1001.json"] and now["work-1000.json"] != old["work-1000.json"]
    assert not [p for p in (data / "fetched").iterdir() if p.name.endswith(".tmp")]
    catalog.load(data)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (needs root and mount rights; skipped without them)."""
    where = tmp_path / "tiny"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_really_full_disk_stops_the_run_cleanly(tmp_path, tiny_disk, fake_openalex, openalex_url, capsys):
    data = pinned_catalog(tmp_path / "data", fake_openalex, 40)  # 40 records, a 4 KiB page each
    (data / "fetched").symlink_to(tiny_disk, target_is_directory=True)  # ... on 16 pages
    assert refresh(data) == 4
    err = capsys.readouterr().err
    assert "No space left on device" in err and "cannot write" in err
    assert_no_traceback(err)
    for text in records_in(data).values():
        FetchedRecord.model_validate_json(text)  # every file is whole
    assert not [p for p in (data / "fetched").iterdir() if p.name.endswith(".tmp")]


def test_permission_denied_names_the_file(tmp_path, fake_openalex, openalex_url, monkeypatch, capsys):
    data = pinned_catalog(tmp_path, fake_openalex, 2)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(store.tempfile, "mkstemp", denied)
    assert refresh(data) == 4
    err = capsys.readouterr().err
    assert "cannot write" in err and "work-1000.json: Permission denied" in err
    assert records_in(data) == {}


def test_records_get_0644_or_the_mode_of_the_file_they_replace(tmp_path, fake_openalex, openalex_url):
    data = pinned_catalog(tmp_path, fake_openalex, 2)
    old_mask = os.umask(0o022)
    try:
        assert refresh(data) == 0
        path = data / "fetched" / "work-1000.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.chmod(path, 0o664)
        fake_openalex.works["W1000"]["cited_by_count"] += 1
        assert refresh(data) == 0
        assert stat.S_IMODE(path.stat().st_mode) == 0o664
    finally:
        os.umask(old_mask)


def every_reader(data: Path, cwd: Path):
    """``(script, output)`` of validate, a dry-run refresh and a site build on ``data``; each must
    fail with status 1 or 2 and no traceback."""
    for script, args in (
        ("validate.py", ["--no-imports", "--data-dir", str(data)]),
        ("refresh.py", ["--dry-run", "--data-dir", str(data)]),
        ("site.py", ["build", "--data-dir", str(data), "--no-measure", "--out", str(cwd / "o")]),
    ):
        proc = run_script(str(SCRIPTS / script), *args, cwd=cwd)
        text = proc.stdout + proc.stderr
        assert proc.returncode in (1, 2), (script, text)
        assert_no_traceback(text)
        yield script, text


def test_a_curated_file_that_is_not_utf8_is_reported_with_its_line(tmp_path, data_copy):
    path = data_copy / "works" / "switch-transformer.yaml"
    lines = path.read_bytes().split(b"\n")
    lines[3] = lines[3] + b" \xff\xfe"
    path.write_bytes(b"\n".join(lines))
    for script, text in every_reader(data_copy, tmp_path):
        assert "switch-transformer.yaml:4" in text and "not UTF-8 text: byte 0xff at line 4" in text, (
            script,
            text,
        )


def test_a_fetched_record_that_is_not_utf8_is_reported(tmp_path, data_copy):
    (data_copy / "fetched" / "efficient-routing-sparse-moe.json").write_bytes(b'{\n  "slug": "\xe9"\n}\n')
    proc = run_script(
        str(SCRIPTS / "validate.py"), "--no-imports", "--data-dir", str(data_copy), cwd=tmp_path
    )
    assert proc.returncode == 1
    assert "efficient-routing-sparse-moe.json:2" in proc.stdout and "not UTF-8" in proc.stdout
    assert_no_traceback(proc.stdout + proc.stderr)


def test_a_symlink_loop_is_one_clear_message(tmp_path, data_copy):
    works = data_copy / "works"
    (works / "loop-a.yaml").symlink_to(works / "loop-b.yaml")
    (works / "loop-b.yaml").symlink_to(works / "loop-a.yaml")
    for script, text in every_reader(data_copy, tmp_path):
        assert "loop-a.yaml" in text and "Too many levels of symbolic links" in text, (script, text)


# -- 8. curated-input edge cases ----------------------------------------------------------------


def test_a_yml_work_file_is_an_error_not_ignored(tmp_path, data_copy):
    shutil.copy(data_copy / "works" / "dbrx.yaml", data_copy / "works" / "dbrx-copy.yml")
    proc = run_script(
        str(SCRIPTS / "validate.py"), "--no-imports", "--data-dir", str(data_copy), cwd=tmp_path
    )
    assert proc.returncode == 1
    assert "dbrx-copy.yml: not a work file" in proc.stdout and "rename it to dbrx-copy.yaml" in proc.stdout


def test_a_broken_taxonomy_is_reported_once(tmp_path, data_copy):
    (data_copy / "taxonomy.yaml").write_text("nodes: [\n  - id: broken\n", encoding="utf-8")
    proc = run_script(
        str(SCRIPTS / "validate.py"), "--no-imports", "--data-dir", str(data_copy), cwd=tmp_path
    )
    assert proc.returncode == 1
    problems = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(problems) == 1 and "taxonomy.yaml" in problems[0], proc.stdout
    assert "unknown taxonomy node" not in proc.stdout


def test_bidirectional_overrides_from_fetched_data_are_neutralised():
    from scripts.sitegen.text import code, excerpt, h, md

    evil = "Routing \u202egnp.exe\u202c and \u2066isolated\u2069 text"
    for out in (h(evil), md(evil), code(evil), excerpt(evil)):
        assert not any(ch in out for ch in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
        assert "gnp.exe" in out


def test_an_unreadable_checked_file_is_a_warning_not_a_traceback(
    tmp_path, fake_openalex, openalex_url, caplog
):
    data = pinned_catalog(tmp_path, fake_openalex, 2)
    assert refresh(data) == 0
    (data / "fetched" / "checked.yaml").write_bytes(b"work-1000: '\xff\xfe'\n")
    assert refresh(data, "--older-than", "1") == 0
    assert "checked.yaml: unreadable" in caplog.text
