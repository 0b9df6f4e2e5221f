"""scripts/refresh.py under faults: throttling, 5xx, timeouts, bad bodies, spent budget, no server, kills."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from refresh_helpers import REFRESH_SCRIPT, REPO, pinned_catalog, record, refresh, small_catalog, snapshot

import catalog
from catalog.models import FetchedRecord


def subprocess_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENALEX_")}
    env.update(OPENALEX_URL=url, OPENALEX_API_KEY="test-key", PYTHONUNBUFFERED="1")
    return env


def records_in(data: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((data / "fetched").glob("*.json"))}


def test_429_with_retry_after_is_waited_out(tmp_path, fake_openalex, openalex_url, capsys):
    data = small_catalog(tmp_path, fake_openalex)
    fake_openalex.fail("list", 429, headers={"Retry-After": "3", "X-RateLimit-Remaining-USD": "0.9"})
    sleeps: list[float] = []
    assert refresh(data, sleeps=sleeps) == 0
    assert sleeps == [3.0]
    assert record(data, "efficient-routing-sparse-moe").openalex_id == "W4402351149"
    assert "1 retries" in capsys.readouterr().out


def test_repeated_5xx_fail_that_batch_and_the_run_goes_on(tmp_path, fake_openalex, openalex_url, caplog):
    data = pinned_catalog(tmp_path, fake_openalex, 150)
    fake_openalex.fail("list", 502, times=3)
    sleeps: list[float] = []
    assert refresh(data, "--attempts", "3", "--backoff", "0.5", sleeps=sleeps) == 1
    assert len(sleeps) == 2 and 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0  # doubled, jittered down
    assert len(records_in(data)) == 50
    assert "a list request for 100 works failed: HTTP 502 from http://127.0.0.1" in caplog.text
    assert "after 3 attempts" in caplog.text


def test_timeouts_are_retried_then_succeed(tmp_path, fake_openalex, openalex_url):
    data = small_catalog(tmp_path, fake_openalex)
    fake_openalex.stall("list", 2.0)
    assert refresh(data, "--timeout", "0.3") == 0
    assert len(fake_openalex.requests_of("list")) == 2
    assert len(records_in(data)) == 4


def test_malformed_json_fails_its_batch_and_the_run_goes_on(tmp_path, fake_openalex, openalex_url, caplog):
    data = pinned_catalog(tmp_path, fake_openalex, 150)
    fake_openalex.malform("list", times=5)  # every attempt of the first batch
    assert refresh(data) == 1
    assert len(records_in(data)) == 50
    (line,) = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert line.startswith("a list request for 100 works failed: malformed JSON (")
    assert "from http://127.0.0.1" in line and "after 5 attempts" in line


def test_one_malformed_record_fails_only_its_work(tmp_path, fake_openalex, openalex_url, capsys):
    data = pinned_catalog(tmp_path, fake_openalex, 5)
    fake_openalex.works["W1002"]["counts_by_year"] = {"2025": 3}
    assert refresh(data) == 1
    assert sorted(records_in(data)) == [
        "work-1000.json",
        "work-1001.json",
        "work-1003.json",
        "work-1004.json",
    ]
    out = capsys.readouterr().out
    assert "work-1002" in out and "counts_by_year" in out


def test_spent_budget_stops_the_run_and_keeps_what_was_fetched(tmp_path, fake_openalex, openalex_url, capsys):
    data = pinned_catalog(tmp_path, fake_openalex, 250)
    spent = {"X-RateLimit-Remaining-USD": "0", "X-RateLimit-Limit-USD": "1", "X-RateLimit-Reset": "36000"}
    fake_openalex.fail("list", 429, after=1, headers=spent)
    sleeps: list[float] = []
    assert refresh(data, sleeps=sleeps) == 3
    assert sleeps == [] and len(fake_openalex.requests_of("list")) == 2
    assert len(records_in(data)) == 100
    assert all(FetchedRecord.model_validate_json(b) for b in records_in(data).values())
    out = capsys.readouterr().out
    assert "not fetched (stopped)" in out and "150" in out and "resets in 10.0 h" in out


def test_unreachable_openalex_exits_nonzero_with_one_line_and_changes_nothing(tmp_path, fake_openalex):
    data = small_catalog(tmp_path, fake_openalex)
    before = snapshot(data)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    proc = subprocess.run(
        [sys.executable, str(REFRESH_SCRIPT), "--data-dir", str(data), "--attempts", "2", "--backoff", "0"],
        capture_output=True, text=True, env=subprocess_env(url), cwd=REPO, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"ERROR catalog.refresh: cannot reach OpenAlex at {url}: connection failed "
                     "(connection refused) after 2 attempts"]  # fmt: skip
    assert proc.stdout == ""
    assert snapshot(data) == before


def _start(data: Path, url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REFRESH_SCRIPT), "--data-dir", str(data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env(url), cwd=REPO,
    )  # fmt: skip


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the refresh process")
        time.sleep(0.02)


def _assert_old_or_new(
    data: Path, old: dict[str, bytes], curated: dict[str, str], new_min: int = 100
) -> dict[str, str]:
    """Every record is a whole valid file, either untouched or rewritten; returns name -> old/new."""
    state = {}
    for name, text in records_in(data).items():
        rec = FetchedRecord.model_validate_json(text)
        state[name] = "old" if text == old.get(name) else "new"
        if state[name] == "new":
            assert rec.cited_by_count >= new_min, f"{name} is neither the old nor the new record"
    assert snapshot(data / "works") == curated
    catalog.load(data)  # temporary files are never read as records
    return state


def test_kill_during_a_stalled_batch_leaves_whole_records(tmp_path, fake_openalex, openalex_url):
    data = pinned_catalog(tmp_path, fake_openalex, 150)
    assert refresh(data) == 0
    old, curated = records_in(data), snapshot(data / "works")
    for w in fake_openalex.works.values():
        w["cited_by_count"] += 100
    fake_openalex.log.clear()
    fake_openalex.stall("list", 60.0, after=1)
    proc = _start(data, openalex_url)
    try:
        _wait_for(lambda: len(fake_openalex.requests_of("list")) == 2)
        _wait_for(lambda: sum(v == "new" for v in _assert_old_or_new(data, old, curated).values()) == 100)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        fake_openalex.release.set()
    state = _assert_old_or_new(data, old, curated)
    assert sorted(state.values()).count("new") == 100 and len(state) == 150


def test_kills_at_random_moments_never_leave_a_partial_record(tmp_path, fake_openalex, openalex_url):
    data = pinned_catalog(tmp_path, fake_openalex, 300)
    assert refresh(data) == 0
    curated = snapshot(data / "works")
    rng = random.Random(1234)
    for round_ in range(4):
        old = records_in(data)
        for w in fake_openalex.works.values():
            w["cited_by_count"] = 100 + round_ * 1000 + rng.randrange(100)
        fake_openalex.log.clear()
        proc = _start(data, openalex_url)
        _wait_for(lambda: len(fake_openalex.log) >= 1)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _assert_old_or_new(data, old, curated, new_min=100 + round_ * 1000)
    leftovers = [p for p in (data / "fetched").iterdir() if p.name.endswith(".tmp")]
    assert refresh(data) == 0  # a full run afterwards cleans up whatever a kill left behind
    assert not any(p.exists() for p in leftovers)
    assert not [p for p in (data / "fetched").iterdir() if p.name.endswith(".tmp")]
    assert min(json.loads(t)["cited_by_count"] for t in records_in(data).values()) >= 3100
