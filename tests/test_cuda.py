"""The same guarantees on a CUDA device: plan contract, CPU/CUDA agreement, layer = oracle, solvers.

Every test here is marked ``cuda`` and skips without a GPU; the CPU suites check the same
properties on the CPU. Run only these with ``pytest -m cuda``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from test_layer import CASES, assert_matches_oracle, make_layer
from test_router_contract import NAMES, build, check_invariants, expect, tokens

import impls
from impls.ops.auction import balanced_assignment, balanced_capacities
from impls.ops.sinkhorn import sinkhorn

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

CUDA = "cuda"


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """TF32 would make CUDA float32 differ from the CPU by ~1e-3; the comparisons here are exact-ish."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def _cpu(plan: impls.RoutingPlan) -> impls.RoutingPlan:
    moved = {
        f.name: getattr(plan, f.name).cpu()
        for f in dataclasses.fields(plan)
        if isinstance(getattr(plan, f.name), torch.Tensor)
    }
    moved["losses"] = {k: v.cpu() for k, v in plan.losses.items()}
    return dataclasses.replace(plan, **moved)


def _build_quiet(name: str, **options) -> impls.Router:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # expert choice warns that it is not causal
        return build(name, **options)


# ------------------------------------------------------------------------------------ router contract


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_plan_invariants_on_cuda(name: str, mode: str) -> None:
    router = _build_quiet(name).to(CUDA).train(mode == "train")
    plan = router(tokens(name).to(CUDA))
    assert plan.expert_ids_TK.device.type == "cuda" and plan.weights_TK.device.type == "cuda"
    check_invariants(router, _cpu(plan), expect(name).weight_tol)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_router_parameters_on_cuda(name: str) -> None:
    router = _build_quiet(name).to(CUDA).train()
    params = [p for p in router.parameters() if p.requires_grad]
    if not params:
        pytest.skip("router has no trainable parameters")
    torch.manual_seed(3)
    plan = router(tokens(name).to(CUDA))
    loss = (plan.weights_TK * torch.rand_like(plan.weights_TK)).sum()
    loss = loss + sum(v for v in plan.losses.values() if v.requires_grad)
    loss.backward()
    got = [p.grad for p in params if p.grad is not None]
    assert got and all(torch.isfinite(g).all() for g in got)
    assert any(g.abs().sum() > 0 for g in got)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_cuda_input_routes_like_float32_cpu(name: str) -> None:
    router = _build_quiet(name).eval()
    x = tokens(name).bfloat16()
    a = router(x.float())
    b = router.to(CUDA)(x.to(CUDA))
    assert b.weights_TK.dtype == torch.float32
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK.cpu())
    assert torch.equal(a.keep_TK, b.keep_TK.cpu())
    torch.testing.assert_close(a.weights_TK, b.weights_TK.cpu(), atol=1e-5, rtol=1e-5)
    for k in a.losses:
        torch.testing.assert_close(a.losses[k], b.losses[k].cpu(), atol=1e-5, rtol=1e-4)


# -------------------------------------------------------------------------------------- MoE layer


@pytest.mark.parametrize("impl", ["grouped_mm", "bmm"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_matches_the_loop_oracle_on_cuda(case: str, impl: str) -> None:
    assert_matches_oracle(make_layer(case, impl).to(CUDA).train(), (2, 16), device=CUDA)


@pytest.mark.parametrize("impl", ["grouped_mm", "bmm"])
@pytest.mark.parametrize(
    "case", ["dropless-top2-swiglu", "capacity-top2-st-moe", "groups-sigmoid-deepseek-v3"]
)
def test_bf16_layer_matches_the_loop_oracle_on_cuda(case: str, impl: str) -> None:
    layer = make_layer(case, impl, dtype=torch.bfloat16).to(CUDA).train()
    assert_matches_oracle(layer, (4, 32), torch.bfloat16, CUDA)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_layer_equals_the_cpu_layer(case: str) -> None:
    layer = make_layer(case, "auto").eval()
    x = torch.randn(3, 10, 16)
    with torch.no_grad():
        a, pa = layer(x)
        b, pb = layer.to(CUDA)(x.to(CUDA))
    assert torch.equal(pa.expert_ids_TK, pb.expert_ids_TK.cpu())
    torch.testing.assert_close(a, b.cpu(), atol=1e-5, rtol=1e-5)


def test_grouped_mm_runs_natively_on_cuda_for_aligned_bf16_widths() -> None:
    from impls.layer import grouped_mm_available

    assert grouped_mm_available("cuda", torch.bfloat16)


def test_layer_forward_and_backward_make_no_host_sync_in_dropless_mode() -> None:
    layer = impls.MoELayer(64, 128, 8, router="topk", k=2, dtype=torch.bfloat16).to(CUDA)
    x = torch.randn(4, 64, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    layer(x)[0].sum().backward()  # warm-up (grouped_mm probing may sync once per dtype)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, plan = layer(x)
        (out.float().sum() + plan.losses["load_balance"]).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------------------ solvers


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_sinkhorn_on_cuda_meets_marginals_and_matches_the_cpu(scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    S = scale * torch.randn(512, 16, generator=g)
    cpu = sinkhorn(S, epsilon=scale, max_iters=500, tol=1e-4)  # epsilon on the scale of the logits
    gpu = sinkhorn(S.to(CUDA), epsilon=scale, max_iters=500, tol=1e-4)
    plan = gpu.plan.cpu()
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(-1), torch.ones(512), atol=1e-5, rtol=0)
    assert float((plan.sum(0) / (512 / 16) - 1).abs().max()) < 1e-4
    assert int(gpu.iterations) <= 500
    torch.testing.assert_close(plan, cpu.plan, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("seed", range(20))
def test_balanced_assignment_on_cuda_equals_the_scipy_optimum(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    T, E = 64 + 7 * seed, 2 + seed % 7
    a = torch.randn(T, E, generator=g)
    if seed % 3 == 0:
        a = a.round()
    res = balanced_assignment(a.to(CUDA))
    cap = balanced_capacities(T, E)
    expert_T = res.expert_T.cpu()
    assert torch.equal(torch.bincount(expert_T, minlength=E), cap)
    cols = np.repeat(np.arange(E), cap.numpy())
    r, c = linear_sum_assignment(a.double().numpy()[:, cols], maximize=True)
    best = float(a.double().numpy()[r, cols[c]].sum())
    got = float(a.double().gather(1, expert_T[:, None]).sum())
    assert math.isclose(got, best, rel_tol=1e-9, abs_tol=1e-9)


def test_expert_choice_takes_exactly_its_capacity_on_cuda() -> None:
    router = _build_quiet("expert_choice", capacity_factor=1.5).to(CUDA).train()
    plan = router(tokens("expert_choice", n=20).to(CUDA))
    C = math.ceil(20 * 1.5 / router.num_experts)
    assert plan.capacity == C
    assert plan.expert_load.tolist() == [C] * router.num_experts
