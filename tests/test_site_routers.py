"""What the router pages show is real: every usage snippet runs, every router and preset measures."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from site_fixtures import REPO

import catalog
import impls
from scripts.sitegen.context import SiteContext
from scripts.sitegen.pages_parallel import parallel_page
from scripts.sitegen.pages_routers import interop_page, routers_index
from scripts.sitegen.routers import MeasureSetup, discover, measure_router, usage_snippets

FAMILIES = discover(measure=False)
SNIPPETS = [
    pytest.param(code, id=f"{fam.name}-{i}")
    for fam in FAMILIES
    for i, code in enumerate(fam.snippets, start=1)
]
NAMES = [(r.name, "router", None) for fam in FAMILIES for r in fam.routers] + [
    (p.name, "preset", p.num_experts) for fam in FAMILIES for p in fam.presets
]


def test_home_page_python_snippets_run():
    snippets = usage_snippets((REPO / "site" / "index.md").read_text(encoding="utf-8"))
    assert snippets, "the home page shows how to import the routers"
    for code in snippets:
        exec(compile(code, "<home page snippet>", "exec"), {"__name__": "__snippet__"})


@pytest.mark.skipif(not FAMILIES, reason="no routers registered yet")
def test_router_index_snippet_runs():
    ctx = SiteContext.build(catalog.load(), FAMILIES, set())
    (code,) = usage_snippets(routers_index(ctx))
    exec(compile(code, "<router index snippet>", "exec"), {"__name__": "__snippet__"})


def test_every_registered_router_and_preset_belongs_to_a_family_page():
    assert {r.name for fam in FAMILIES for r in fam.routers} == set(impls.ROUTERS)
    assert {p.name for fam in FAMILIES for p in fam.presets} == set(impls.PRESETS)
    for fam in FAMILIES:
        assert (REPO / fam.source_rel).read_text(encoding="utf-8") == fam.source
        assert fam.api_members, f"{fam.module} has no public members for the API section"


@pytest.mark.skipif(not SNIPPETS, reason="no router family documents a usage snippet yet")
@pytest.mark.parametrize("code", SNIPPETS)
def test_usage_snippet_from_the_module_docstring_runs(code):
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*not causal", category=UserWarning)  # examples may say so
    exec(compile(code, "<docstring snippet>", "exec"), {"__name__": "__snippet__"})


@pytest.mark.skipif(not NAMES, reason="no routers registered yet")
@pytest.mark.parametrize(("name", "kind", "num_experts"), NAMES, ids=[n for n, _, _ in NAMES])
def test_router_measures_on_the_skewed_batch(name, kind, num_experts):
    setup = MeasureSetup(tokens=256, repeats=1)
    m = measure_router(name, kind, setup, num_experts)
    assert m.error is None, m.error
    assert len(m.load) == m.num_experts == (num_experts or setup.num_experts)
    assert m.load_max_over_mean >= 1.0 and 0.0 <= m.fraction_dropped <= 1.0
    assert 0.0 < m.router_confidence <= 1.0 + 1e-6 and m.forward_ms > 0
    router = impls.ROUTERS[impls.PRESETS[name].router if name in impls.PRESETS else name]
    if router.plan_type == "tokens":
        assert math.isclose(sum(m.load), m.experts_per_token * setup.tokens, rel_tol=1e-5)
    else:  # token-equivalents: every token's convex weights over the experts add up to one token
        assert math.isclose(sum(m.load), setup.tokens, rel_tol=1e-4)


def test_measurement_batch_is_seeded_and_skewed():
    setup = MeasureSetup()
    a, b = setup.batch(), setup.batch()
    assert torch.equal(a, b) and a.shape == (setup.tokens, setup.d_model)
    assert not torch.equal(a, MeasureSetup(seed=1).batch())


def test_a_failing_router_is_reported_not_raised():
    m = measure_router("no-such-router", "router", MeasureSetup(tokens=16, repeats=1))
    assert m.error is not None and "no-such-router" in m.error


def test_interop_page_lists_every_block_and_every_declared_compile_break():
    pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")
    import impls.hf

    ctx = SiteContext.build(catalog.load(), FAMILIES, set())
    page = interop_page(ctx)
    for cls_name in impls.hf.SUPPORTED_BLOCKS:
        assert f"| `{cls_name}` |" in page
    assert "| `thor` | eval |" in page and "| `sinkhorn_ot` | training |" in page
    assert "| `topk` |" not in page  # the top-k family captures one graph
    (code,) = usage_snippets(page)
    exec(compile(code, "<interop page snippet>", "exec"), {"__name__": "__snippet__"})


def test_expert_parallelism_page_documents_every_policy_and_its_snippets_run(tmp_path):
    import os
    import subprocess
    import sys

    from impls.parallel import POLICIES
    from scripts.sitegen.pages_works import work_page  # noqa: F401  (the work pages link here)
    from tests.dist_helpers import free_port

    cat = catalog.load()
    ctx = SiteContext.build(cat, FAMILIES, set())
    page = parallel_page(ctx)
    for name, cls in POLICIES.items():
        assert f"{{#policy-{name}}}" in page and f"`{cls.__name__}`" in page
        for slug in cls.papers:
            assert f"../works/{slug}.md" in page, slug
    assert "## Measured" in page
    train, checkpoint, sim = usage_snippets(page)
    exec(compile(sim, "<expert parallelism page: simulator>", "exec"), {"__name__": "__snippet__"})
    # the training and checkpoint snippets, as one script under torchrun with 2 processes
    script = tmp_path / "train.py"
    script.write_text(train + "\n" + checkpoint + "\ndist.destroy_process_group()\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr"]
    cmd += ["127.0.0.1", "--master-port", str(free_port()), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ckpt" / ".metadata").exists()


def test_system_balancing_works_link_to_their_policies():
    from scripts.sitegen.pages_works import work_page

    cat = catalog.load()
    ctx = SiteContext.build(cat, FAMILIES, set())
    for slug, name in {"llep": "llep", "finemoe": "finemoe", "realb": "realb", "relibra": "relibra"}.items():
        page = work_page(ctx, cat.work(slug))
        assert f"../routers/expert-parallelism.md#policy-{name}" in page, slug
