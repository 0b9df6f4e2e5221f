"""torch.compile: every registered router and preset, and the MoE layer, compiled on CPU equal eager.

Each name is compiled with the default (inductor) backend twice: in ``eval()`` on float32 tokens
and in training on bfloat16 tokens (forward and backward), and with ``aot_eager`` for the other
two combinations, so both modes and both dtypes are covered by the compiler that generates code
and every graph is captured. A router whose ``compile_break`` is ``None`` must compile with
``fullgraph=True`` (one graph: no graph break and no host sync); the others say why and compile
with their break. ``torch._inductor.config.fallback_random`` makes compiled random draws (jitter,
sampling) the eager ones, so training-mode plans compare too.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch._inductor.config

import impls
from tests.test_router_contract import ALL_NAMES, build, plan_type, tokens

pytestmark = pytest.mark.slow

#: routers whose one-graph capture is not expected anywhere (reason in ``compile_break``)
FULLGRAPH_KNOWN_BREAKS = {
    "sinkhorn_ot",
    "efficient_routing_ot",
    "sinkhorn_balanced",
    "s_base",
    "selective_sinkhorn",
    "ssr",
    "balanced_assignment",
    "base_layers",
    "bip",
    "bip_balancing",
    "thor",
    "thor_iwslt",
}


@pytest.fixture(autouse=True)
def _fresh_compiler():
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


def _inputs(name: str, dtype: torch.dtype) -> torch.Tensor:
    x = tokens(name).to(dtype)
    return x.view(2, -1, x.shape[-1]) if plan_type(name) != "tokens" else x


def _tensors(plan) -> dict[str, torch.Tensor]:
    out = {}
    for field in (
        "expert_ids_TK",
        "weights_TK",
        "keep_TK",
        "dispatch_BLS",
        "combine_BLS",
        "weights_BGE",
    ):
        v = getattr(plan, field, None)
        if isinstance(v, torch.Tensor):
            out[field] = v
    for k, v in plan.losses.items():
        out[f"loss:{k}"] = v
    return out


def _same(eager, compiled, name: str) -> None:
    a, b = _tensors(eager), _tensors(compiled)
    assert set(a) == set(b), name
    for k in a:
        if a[k].dtype in (torch.bool, torch.long, torch.int32):
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs compiled"
        else:
            torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=2e-5, msg=f"{name}: {k}")


def _compile(router: impls.Router, backend: str):
    reason = router.compile_break
    if reason is None:
        return torch.compile(router, fullgraph=True, backend=backend)
    assert isinstance(reason, str) and len(reason) > 20
    return torch.compile(router, backend=backend)


def _run(name: str, backend: str, training: bool, dtype: torch.dtype) -> None:
    """The eager router and a compiled copy with the same state see the same batch: the same plan,
    the same state afterwards (counts, biases, duals) and, in training, the same gradients."""
    router = build(name).train(training)
    with torch.no_grad():  # away from any kink (a norm at exactly 0 has no stable gradient)
        g0 = torch.Generator().manual_seed(11)
        for p in router.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g0).to(p.dtype))
    reference = copy.deepcopy(router)
    x = _inputs(name, dtype)
    seed = 1234
    torch.manual_seed(seed)
    eager = reference(x)
    compiled_router = _compile(router, backend)
    torch.manual_seed(seed)
    got = compiled_router(x)
    _same(eager, got, name)
    for (n, a), (_, b) in zip(reference.named_buffers(), router.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=2e-5, msg=f"{name}: state {n} after the call")
    params = [p for p in router.parameters() if p.requires_grad]
    if not (training and params):
        return
    g = torch.Generator()

    def objective(plan):
        g.manual_seed(5)
        total = sum((v.float() * 0.1 for v in plan.losses.values()), torch.zeros(()))
        for t in _tensors(plan).values():
            if t.is_floating_point() and t.requires_grad:
                total = total + (t.float() * torch.randn(t.shape, generator=g)).sum()
        return total

    ref_params = [p for p in reference.parameters() if p.requires_grad]
    want = torch.autograd.grad(objective(eager), ref_params, allow_unused=True)
    have = torch.autograd.grad(objective(got), params, allow_unused=True)
    for p, w, h in zip(params, want, have, strict=True):
        if w is None:
            assert h is None or torch.count_nonzero(h) == 0
            continue
        torch.testing.assert_close(h, w, atol=1e-4, rtol=1e-4, msg=f"{name}: gradient {tuple(p.shape)}")


@pytest.mark.parametrize("name", ALL_NAMES)
def test_compiled_router_equals_eager_in_eval_float32(name):
    _run(name, "inductor", training=False, dtype=torch.float32)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_compiled_router_equals_eager_in_training_bfloat16(name):
    _run(name, "inductor", training=True, dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_graph_capture_in_the_other_two_combinations(name):
    _run(name, "aot_eager", training=False, dtype=torch.bfloat16)
    torch._dynamo.reset()
    _run(name, "aot_eager", training=True, dtype=torch.float32)


def test_breaks_are_declared_by_the_routers_that_have_them():
    """The top-k family and every router not listed here capture one graph in both modes."""
    for name in ALL_NAMES:
        r = build(name)
        declared = {r.train().compile_break, r.eval().compile_break} - {None}
        assert bool(declared) == (name in FULLGRAPH_KNOWN_BREAKS), name
    r = build("sinkhorn_ot", sinkhorn_tol=None)
    assert r.train().compile_break is None  # a fixed iteration count needs no sync


# ----------------------------------------------------------------------------- the layer

LAYER_ROUTERS = {
    "topk": {},
    "mixtral_8x7b": {},
    "switch_base": {},
    "deepseek_v3": {"k": 2, "n_group": 4, "topk_group": 2},
    "expert_choice": {},
    "sinkhorn_ot": {},
    "soft_moe": {},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("router", list(LAYER_ROUTERS))
def test_compiled_layer_trains_like_eager(router, dtype):
    torch.manual_seed(0)
    options = LAYER_ROUTERS[router]
    layer = impls.MoELayer(32, 64, num_experts=8, router=router, activation="swiglu", dtype=dtype, **options)
    fullgraph = layer.router.compile_break is None
    x = torch.randn(2, 16, 32, dtype=dtype)
    gy = torch.randn(2, 16, 32, dtype=dtype)

    def step(fn):
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)
        out, _ = fn(xi)
        (out.float() * gy.float()).sum().backward()
        grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
        layer.zero_grad(set_to_none=True)
        return out, xi.grad, grads

    want = step(layer)
    have = step(torch.compile(layer, fullgraph=fullgraph))
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(have[0], want[0], **tol)
    torch.testing.assert_close(have[1], want[1], **tol)
    for a, b in zip(have[2], want[2], strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_compiled_layer_with_capacity_groups_biases_and_relu_experts():
    torch.manual_seed(0)
    layer = impls.MoELayer(
        32,
        64,
        num_experts=4,
        router="switch",
        activation="relu",
        expert_bias=True,
        output_bias=True,
        expert_capacity=3,
        capacity_groups="sequence",
    ).eval()
    x = torch.randn(3, 8, 32)
    out, plan = layer(x)
    got, plan2 = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(got, out, atol=1e-5, rtol=1e-5)
    assert torch.equal(plan2.keep_TK, plan.keep_TK)
