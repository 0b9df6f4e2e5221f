"""The routing arena: metric formulas on hand-checked cases, the corpus split, the harness end to end
on the committed sample (tiny model, few steps), determinism, resuming, and the site's arena pages."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

import catalog
import impls
from scripts import arena_run
from scripts.arena import metrics
from scripts.arena.corpus import DOMAINS, Corpus, CorpusError, fortune_entries, is_validation
from scripts.arena.harness import ArenaConfig, applicability, run
from scripts.sitegen.arena import claims, load_results, summarize, tokens_to_reach
from scripts.sitegen.context import SiteContext
from scripts.sitegen.pages_arena import arena_page, family_arena
from scripts.sitegen.routers import discover

SAMPLE = Path(__file__).resolve().parent / "arena_sample"
TINY = ArenaConfig(model=arena_run.TINY, steps=3, batch=4, eval_every=2, eval_windows=2, warmup=1, threads=1)

# ---------------------------------------------------------------------------------- metrics


def test_load_statistics_by_hand():
    assert metrics.load_stats(torch.tensor([5.0, 5.0, 5.0, 5.0])) == {
        "max_over_mean": 1.0,
        "cv": 0.0,
        "gini": 0.0,
    }
    one = metrics.load_stats(torch.tensor([8.0, 0.0, 0.0, 0.0]))
    assert one["max_over_mean"] == 4.0 and one["gini"] == pytest.approx(0.75)  # 1 - 1/E
    assert one["cv"] == pytest.approx(math.sqrt(3))  # std [6, 2, 2, 2] / mean 2, population std
    two = metrics.load_stats(torch.tensor([1.0, 3.0]))
    assert two["gini"] == pytest.approx(0.25) and two["cv"] == pytest.approx(0.5)


def test_mutual_information_of_domain_exclusive_routing_is_the_domain_entropy():
    domains = torch.tensor([0, 0, 1, 2])  # P(domain) = 1/2, 1/4, 1/4: H = 1.5 bits
    exclusive = torch.nn.functional.one_hot(torch.tensor([3, 3, 0, 1]), 4).float()
    assert metrics.mutual_information(domains, exclusive, 3) == pytest.approx(1.5)
    assert metrics.entropy_bits(torch.bincount(domains).float()) == pytest.approx(1.5)
    ignoring = torch.full((4, 4), 0.25)  # every token spread evenly: nothing about the domain
    assert metrics.mutual_information(domains, ignoring, 3) == pytest.approx(0.0, abs=1e-12)
    same = torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), 4).float()
    assert metrics.mutual_information(domains, same, 3) == pytest.approx(0.0, abs=1e-12)


def test_stability_entropy_and_confidence_by_hand():
    assert metrics.stability(None, torch.tensor([1, 2])) is None
    assert metrics.stability(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 0.5
    ent, conf = metrics.entropy_and_confidence(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    assert ent == pytest.approx(math.log(2) / 2) and conf == pytest.approx(0.75)
    assert metrics.bits_per_byte(math.log(2)) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------- corpus


def test_fortune_entries_and_the_document_split():
    text = b"first\nentry\n%\nsecond\n%\n%\n  \n%\nthird"
    assert fortune_entries(text) == [b"first\nentry", b"second", b"third"]
    assert is_validation("en", "a#1") == is_validation("en", "a#1")
    share = sum(is_validation("py", f"f{i}.py#0") for i in range(5000)) / 5000
    assert 0.08 < share < 0.12  # about 26/256 of the documents


def test_the_committed_sample_matches_its_manifest(tmp_path):
    corpus = Corpus.load(SAMPLE)
    for key, size in corpus.manifest["sizes"].items():
        domain, split = key.split(".")
        data = corpus.train[domain] if split == "train" else corpus.val[domain]
        assert len(data) == size["bytes"]
    assert {p["package"] for p in corpus.manifest["packages"]} == {
        "fortunes",
        "fortunes-de",
        "libpython3.11-stdlib",
    }
    full = json.loads(
        (SAMPLE.parent.parent / "scripts/arena/corpus_manifest.json").read_text(encoding="utf-8")
    )
    assert corpus.manifest["sample_of"] == full["manifest_sha256"]
    assert b"def " in corpus.train["py"]
    broken = tmp_path / "c"
    shutil.copytree(SAMPLE, broken)
    (broken / "de.val.bin").unlink()
    with pytest.raises(CorpusError, match=r"de\.val\.bin"):
        Corpus.load(broken)
    with pytest.raises(CorpusError, match="manifest"):
        Corpus.load(tmp_path / "nothing")


# ---------------------------------------------------------------------------------- harness


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.load(SAMPLE)


def test_a_tiny_run_records_curve_metrics_speed_and_provenance(corpus):
    doc = run("switch_base", 0, corpus, TINY)
    assert doc["status"] == "ok" and doc["kind"] == "preset" and doc["router"] == "switch"
    assert [p["step"] for p in doc["curve"]] == [0, 2, 3]
    final = doc["final"]
    assert set(final["val_bpb_by_domain"]) == set(DOMAINS) and 0 < final["val_bpb"] < 9
    r = final["routing"]
    assert r["max_over_mean"] >= 1.0 and 0 <= r["gini"] < 1 and 0 <= r["domain_mi_bits"] <= 1.6
    assert r["top_expert_changed"] is not None and 0 <= r["fraction_dropped"] <= 1
    assert len(doc["final"]["routing_by_layer"]) == TINY.model.n_layers
    assert doc["speed"]["tokens_per_second"] > 0 and 0 < doc["speed"]["router_share"] < 1
    prov = doc["provenance"]
    assert set(prov) >= {"commit", "torch", "machine", "date", "corpus_manifest_sha256"}
    assert prov["corpus_manifest_sha256"] == corpus.manifest_sha256


def test_runs_are_deterministic_for_a_seed(corpus):
    a, b = run("topk", 3, corpus, TINY), run("topk", 3, corpus, TINY)
    assert [p["val_bpb"] for p in a["curve"]] == [p["val_bpb"] for p in b["curve"]]
    assert a["final"]["routing"] == b["final"]["routing"]
    c = run("topk", 4, corpus, TINY)
    assert [p["val_bpb"] for p in c["curve"]][1:] != [p["val_bpb"] for p in a["curve"]][1:]


def test_routers_with_inputs_and_thor_train(corpus):
    for name in ("hash", "label", "thor_iwslt", "lory", "expert_choice", "dense_total"):
        doc = run(name, 0, corpus, TINY)
        assert doc["status"] == "ok", (name, doc.get("note"))
    assert "caveat: not causal" in run("expert_choice", 0, corpus, TINY)["note"]
    assert "first segment" in run("lory", 0, corpus, TINY)["note"]


def test_between_step_router_state_is_updated_and_stablemoe_is_frozen(corpus, monkeypatch):
    calls = []
    real = impls.step_routers
    monkeypatch.setattr(impls, "step_routers", lambda model: calls.append(1) or real(model))
    doc = run("stablemoe", 0, corpus, TINY)
    assert doc["status"] == "ok"
    assert len(calls) == TINY.steps  # once per optimizer step
    # the last evaluations route by the frozen distilled router: no token changes its expert
    assert doc["curve"][-1]["routing"]["top_expert_changed"] == 0.0


def test_non_causal_and_unbuildable_entries_are_reported_not_run(corpus):
    ok, why = applicability("soft_moe")
    assert not ok and "not causal" in why
    doc = run("smear", 0, corpus, TINY)
    assert doc["status"] == "not_applicable" and "whole sequence" in doc["note"] and "curve" not in doc
    doc = run("deepseek_v3", 0, corpus, TINY)  # k = 8 of the tiny model's 4 experts
    assert doc["status"] == "not_applicable" and "cannot be built with 4 experts" in doc["note"]


def test_the_command_writes_one_file_per_run_and_resumes(tmp_path, caplog):
    out = tmp_path / "results"
    args = ["--corpus", str(SAMPLE), "--tiny", "--steps", "2", "--results", str(out)]
    assert arena_run.main([*args, "--only", "dense_active", "soft_moe"]) == 0
    files = sorted(p.name for p in out.glob("*.json"))
    assert files == ["dense_active__seed0.json", "soft_moe__seed0.json"]
    stamp = (out / "dense_active__seed0.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="arena"):
        assert arena_run.main([*args, "--only", "dense_active", "soft_moe"]) == 0
    assert "2 runs already have results" in caplog.text
    assert (out / "dense_active__seed0.json").stat().st_mtime_ns == stamp
    assert arena_run.main([*args, "--only", "dense_active", "--force"]) == 0
    assert (out / "dense_active__seed0.json").stat().st_mtime_ns != stamp
    with pytest.raises(SystemExit):
        arena_run.main([*args, "--only", "no_such_router"])
    assert arena_run.main(["--corpus", str(tmp_path / "none"), "--only", "topk"]) == 1


# ---------------------------------------------------------------------------------- site


def _fake(name: str, seed: int, bpbs: list[float], seconds: float = 10.0) -> dict:
    curve = [{"step": i, "tokens": 1000 * i, "val_bpb": b} for i, b in enumerate(bpbs)]
    final = {
        "val_bpb": bpbs[-1],
        "val_bpb_by_domain": {d: bpbs[-1] for d in DOMAINS},
        "routing": {"max_over_mean": 1.2, "domain_mi_bits": 0.3, "gini": 0.1},
    }
    return {
        "name": name,
        "seed": seed,
        "status": "ok",
        "kind": "preset",
        "note": "",
        "curve": curve,
        "final": final,
        "speed": {"tokens_per_second": 100.0, "router_share": 0.1, "train_seconds": seconds},
        "provenance": {
            "commit": "abc",
            "torch": "2",
            "machine": "m",
            "date": "2026-12-01",
            "corpus_manifest_sha256": "x",
        },
    }


def test_tokens_to_reach_interpolates_between_checkpoints():
    curve = [{"tokens": 0, "val_bpb": 8.0}, {"tokens": 100, "val_bpb": 4.0}, {"tokens": 200, "val_bpb": 2.0}]
    assert tokens_to_reach(curve, 3.0) == pytest.approx(150.0)
    assert tokens_to_reach(curve, 9.0) == 0.0
    assert tokens_to_reach(curve, 1.0) is None


def test_the_seed_papers_claims_are_evaluated_on_the_runs():
    fast = [8.0, 4.0, 3.0, 2.9, 2.8]
    slow = [8.0, 6.0, 5.0, 4.0, 3.0]  # reaches 3.0 at 4000 tokens; OT reaches it at 2000: 2x
    results = []
    for s in (0, 1):
        results += [
            _fake("efficient_routing_ot", s, fast),
            _fake("switch_base", s, slow),
            _fake("gshard_top2", s, slow),
        ]
    ot, ssr = claims(summarize(results))
    assert ot.held is True and "2.00×" in ot.measured[0]
    assert ssr.held is None
    results += [_fake("ssr", 0, [8, 3, 2.5], 5.0), _fake("s_base", 0, [8, 4, 3.0], 9.0)]
    ssr = claims(summarize(results))[1]
    assert ssr.held is True
    slower = [r for r in results if r["name"] != "ssr"] + [_fake("ssr", 0, [8, 3, 2.5], 50.0)]
    assert claims(summarize(slower))[1].held is False


def test_the_arena_page_and_router_pages_from_run_results(tmp_path, corpus, caplog):
    out = tmp_path / "r"
    out.mkdir()
    for name in ("switch_base", "switch", "dense_active", "soft_moe"):
        doc = run(name, 0, corpus, TINY)
        (out / f"{name}__seed0.json").write_text(json.dumps(doc), encoding="utf-8")
    (out / "broken__seed0.json").write_text("{not json", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        results = load_results(out)
    assert "broken__seed0.json" in caplog.text and len(results) == 4
    families = discover(measure=False)
    ctx = SiteContext.build(catalog.load(), families, set())
    page = arena_page(ctx, results)
    assert 'atlas-sortable" id="atlas-arena">' in page
    assert page.count('<svg class="atlas-chart') >= 4
    assert "## The seed papers' claims at small scale" in page and "Not measured yet." in page
    assert "| `soft_moe` | not applicable" in page
    assert 'href="../routers/switch/"' in page
    switch = next(f for f in families if f.name == "switch")
    section = family_arena(ctx, switch, results)
    assert section is not None and "routing arena" in section[2]
    assert '<table class="atlas-table atlas-sortable" id="atlas-arena-switch">' in "\n".join(section)
    soft = next(f for f in families if f.name == "soft_moe")
    assert any("`soft_moe` was not run" in line for line in family_arena(ctx, soft, results))
    assert "No arena results are committed yet." in arena_page(ctx, [])


def test_routing_traces_of_trained_models_feed_the_expert_parallel_simulator(tmp_path):
    """``--dump-routing`` saves the validation routing; ``bench_ep.py --trace`` simulates it."""
    import subprocess
    import sys

    results, traces = tmp_path / "results", tmp_path / "routing"
    args = ["--corpus", str(SAMPLE), "--tiny", "--steps", "2", "--results", str(results)]
    assert arena_run.main([*args, "--only", "topk", "--dump-routing", str(traces)]) == 0
    trace = torch.load(traces / "topk__seed0.pt", weights_only=False)
    assert len(trace["layers"]) == TINY.model.n_layers and trace["num_experts"] == TINY.model.num_experts
    ids = trace["layers"][0]["expert_ids"]
    assert ids.shape[1] == 2 and ids.shape[0] == trace["domains"].shape[0] > 0
    assert trace["provenance"]["corpus_manifest_sha256"]
    out = tmp_path / "ep.json"
    script = SAMPLE.parent.parent / "scripts" / "bench_ep.py"
    cmd = [sys.executable, str(script), "--trace", str(traces / "topk__seed0.pt")]
    cmd += ["--world-sizes", "2,4", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["traces"][0]["name"] == "topk" and doc["provenance"]["script"] == "scripts/bench_ep.py"
    rows = doc["rows"]
    assert {(r["world_size"], r["policy"]) for r in rows} >= {(2, "standard"), (4, "llep"), (4, "finemoe")}
    for r in rows:
        std = next(
            s
            for s in rows
            if (s["world_size"], s["layer"], s["policy"]) == (r["world_size"], r["layer"], "standard")
        )
        assert r["mean_load"] == std["mean_load"]  # every policy computes the same rows
        if r["policy"] in ("llep", "finemoe"):
            assert r["max_load"] <= std["max_load"]
    bad = subprocess.run([*cmd[:2], "--trace", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "not a routing trace" in bad.stderr
