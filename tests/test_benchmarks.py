"""The router and layer benchmarks run end to end on tiny shapes and report what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"


def run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def table(out: str, header_start: str) -> dict[str, list[str]]:
    """Rows of the whitespace-aligned table whose header begins with ``header_start``, by name."""
    lines = out.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(header_start))
    cols = [m.start() for m in re.finditer(r"\S+(?: \S+)*", lines[i])]
    rows = {}
    for line in lines[i + 1 :]:
        if not line.strip():
            break
        cells = [line[a:b].strip() for a, b in zip(cols, [*cols[1:], None], strict=True)]
        rows[cells[0]] = cells
    return rows


@pytest.mark.parametrize("script", ["bench_moe.py", "bench_routers_ot.py"])
def test_help_explains_the_benchmark(script):
    out = run(script, "--help")
    assert "usage:" in out and "Examples::" in out and "--device" in out


def test_router_benchmark_reports_ratios_work_and_op_counts():
    out = run(
        "bench_routers_ot.py",
        *("--tokens", "256", "--experts", "8", "--d-model", "32", "--repeats", "1", "--warmup", "0"),
        *("--routers", "base_layers", "s_base"),
    )
    rows = table(out, "router ")
    base, sbase, topk = rows["base_layers"], rows["s_base"], rows["top-k baseline"]
    # columns: router, ms, x top-k, ops, iters, error, rounds, repairs, searches, max/mean load
    assert float(topk[2]) == 1.0
    assert int(base[3]) > int(sbase[3]) > int(topk[3]) > 0
    assert int(sbase[4]) >= 1 and float(sbase[5]) < 1e-3  # Sinkhorn iterations and marginal error
    assert int(base[8]) >= 1 and "(!)" not in base[7]  # searches run, and the optimum certified
    assert float(base[9]) == 1.0  # BASE balances exactly


def test_layer_benchmark_reports_ratios_and_the_gemm_floors():
    out = run(
        "bench_moe.py",
        *("--tokens", "128", "--d-model", "32", "--d-hidden", "64", "--experts", "4", "--k", "2"),
        *("--repeats", "1", "--warmup", "0", "--gemm-floors", "--routers", "topk", "--profile", "5"),
    )
    for method in ("dense", "moe", "loop", "experts only", "loop experts only"):
        assert re.search(rf"^\| {re.escape(method)} \| [0-9.]+ \|", out, re.M), method
    assert re.search(r"^ratio moe/dense = [0-9.]+", out, re.M)
    assert re.search(r"^loop/moe speed-up = [0-9.]+x", out, re.M)
    assert re.search(r"^loop / the layer's expert matmuls alone = [0-9.]+x", out, re.M)
    assert re.search(r"^\| topk \| ", out, re.M)
    for name in ("moe", "dense"):
        profile = out.split(f"## Profile: {name} step", 1)[1]
        assert "Self CPU" in profile and "aten::" in profile


def test_layer_benchmark_against_transformers_and_compiled():
    pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")
    out = run(
        "bench_moe.py",
        *("--tokens", "128", "--d-model", "32", "--d-hidden", "64", "--experts", "4", "--k", "2"),
        *("--activation", "swiglu", "--repeats", "1", "--warmup", "1", "--routers", ""),
        *("--vs-hf", "--compile", "--no-loop"),
    )
    for method in (
        "transformers eager",
        "transformers grouped_mm",
        "transformers batched_mm",
        "moe-atlas layer",
        "moe-atlas layer compiled",
        "moe-atlas grouped-GEMM floor",
        "moe compiled",
        "dense compiled",
    ):
        assert re.search(rf"^\| {re.escape(method)} \| [0-9.]+ \|", out, re.M), method
    assert "max output difference 0" in out or re.search(r"max output difference [0-9.e-]+\)", out)
    assert re.search(
        r"^fastest transformers path: transformers \w+; its time / the layer's = [0-9.]+", out, re.M
    )
    assert re.search(r"^layer / its grouped-GEMM floor = [0-9.]+", out, re.M)
    assert re.search(r"^compiled/eager: moe [0-9.]+, dense [0-9.]+", out, re.M)


def test_expert_parallel_benchmark_help_and_spawned_run(tmp_path):
    out = run("bench_ep.py", "--help")
    assert "usage:" in out and "--world-sizes" in out and "--trace" in out and "torchrun" in out
    res = tmp_path / "ep.json"
    run(
        "bench_ep.py",
        *("--world-sizes", "2", "--tokens", "64", "--d-model", "16", "--d-hidden", "32", "--experts", "4"),
        *("--steps", "2", "--warmup", "1", "--out", str(res)),
    )
    import json

    doc = json.loads(res.read_text())
    assert set(doc["provenance"]) >= {"commit", "torch", "machine", "date"}
    (run_,) = doc["runs"]
    assert run_["launcher"] == "spawn" and run_["world_size"] == 2
    by = {r["policy"]: r for r in run_["results"]}
    assert set(by) == {"standard", "llep", "finemoe", "relibra", "realb"}
    assert all(r["mean_load"] == by["standard"]["mean_load"] for r in by.values())
    assert by["llep"]["imbalance"] <= by["standard"]["imbalance"]
