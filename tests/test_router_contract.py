"""The contract every registered router and preset keeps (all of ``impls.ROUTERS`` and ``impls.PRESETS``).

What a router promises about itself is read from the router: ``combine_normalization`` (what a
token's weights sum to), ``balanced_by_construction``, ``is_causal``. Extra per-name expectations
(build options, token counts, tolerances) go in :data:`EXPECT`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import catalog
import impls
from catalog.core import import_error
from impls.parallel import POLICIES, DispatchPolicy

D = 16
DEFAULT_E = 8
T = 24


def plan_type(name: str) -> str:
    cls = impls.ROUTERS[impls.PRESETS[name].router if name in impls.PRESETS else name]
    return cls.plan_type


ALL_NAMES = sorted(impls.ROUTERS) + sorted(impls.PRESETS)
#: routers and presets returning a ``RoutingPlan`` (the sequence-level ones: test_router_contract_sequence)
NAMES = [n for n in ALL_NAMES if plan_type(n) == "tokens"]
SEQUENCE_NAMES = [n for n in ALL_NAMES if plan_type(n) != "tokens"]


@dataclass(frozen=True)
class Expect:
    """Per-name hook for the contract tests.

    Attributes:
        options: extra options for ``build_router`` (e.g. a router that needs a vocabulary).
        tokens: tokens in the test batch (e.g. a multiple of the expert count).
        weight_tol: tolerance for the normalization check.
        skip: reasons to skip named tests (``{"test_name": "why"}``).
    """

    options: dict[str, Any] = field(default_factory=dict)
    tokens: int = T
    weight_tol: float = 1e-5
    skip: dict[str, str] = field(default_factory=dict)


EXPECT: dict[str, Expect] = {
    "hash": Expect(options={"vocab_size": 64}),
    "hash_layer": Expect(options={"vocab_size": 64}),
    "random_routed_experts": Expect(options={"vocab_size": 64, "num_domains": 2}),
    "pangu_sigma": Expect(options={"vocab_size": 64}),
    "stablemoe": Expect(options={"vocab_size": 64}),
    "stable_moe": Expect(options={"vocab_size": 64}),
    "deepseek_v4_hash": Expect(options={"vocab_size": 64}),
    "moe_plus_plus": Expect(
        skip={
            "test_one_expert_and_k_equal_to_the_expert_count": (
                "MoE++ needs at least one FFN expert beside its 4 zero-computation experts (E >= 5)"
            )
        }
    ),
    "deepseek_v4_flash_hash": Expect(options={"vocab_size": 64}),
    "deepseek_v4_pro_hash": Expect(options={"vocab_size": 64}),
    "lory": Expect(options={"segment_length": 4}),  # several segments in the test's short sequences
    "lory_03b": Expect(options={"segment_length": 4}),
    "m2m_100": Expect(options={"num_labels": 12, "label_to_expert": tuple(i % 8 for i in range(12))}),
}


def routing_ids(lead: tuple[int, ...], bound: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Deterministic ids in ``[0, bound)`` for tokens of leading shape ``lead``; a batch's ids are a
    prefix of a longer batch's, so padding and truncation tests see the same ids."""
    n = 1
    for v in lead:
        n *= v
    return ((torch.arange(n, device=device) * 7 + 3) % bound).view(lead)


def _inject_routing_inputs(module, args, kwargs):
    x = args[0] if args else kwargs.get("x_TD", kwargs.get("x"))
    if isinstance(x, torch.Tensor) and x.dim() >= 2:
        bounds = module.input_ranges()
        for name in module.routing_inputs:
            if name not in kwargs:
                kwargs[name] = routing_ids(tuple(x.shape[:-1]), bounds[name], x.device)
    return args, kwargs


def with_routing_inputs(router: impls.Router) -> impls.Router:
    """Have ``router`` fill in routing inputs (token ids, domain ids, ...) a call leaves out."""
    if router.routing_inputs:
        router.register_forward_pre_hook(_inject_routing_inputs, with_kwargs=True)
    return router


def expect(name: str) -> Expect:
    return EXPECT.get(name, Expect())


def num_experts(name: str) -> int:
    preset = impls.PRESETS.get(name)
    return preset.num_experts if preset is not None and preset.num_experts else DEFAULT_E


def build(name: str, **options: Any) -> impls.Router:
    torch.manual_seed(0)
    opts = {**expect(name).options, **options}
    return with_routing_inputs(impls.build_router(name, d_model=D, num_experts=num_experts(name), **opts))


def tokens(name: str, n: int | None = None, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n or expect(name).tokens, D, generator=g)


def maybe_skip(name: str, test: str) -> None:
    why = expect(name).skip.get(test)
    if why:
        pytest.skip(why)


def same_plan(a: impls.RoutingPlan, b: impls.RoutingPlan, exact: bool = True) -> None:
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    assert torch.equal(a.keep_TK, b.keep_TK)
    if exact:
        assert torch.equal(a.weights_TK, b.weights_TK)
    else:
        torch.testing.assert_close(a.weights_TK, b.weights_TK)
    assert set(a.losses) == set(b.losses)
    for k in a.losses:
        torch.testing.assert_close(a.losses[k], b.losses[k], equal_nan=False)


def check_invariants(router: impls.Router, plan: impls.RoutingPlan, tol: float) -> None:
    E = router.num_experts
    n = plan.num_tokens
    assert plan.weights_TK.dtype == torch.float32
    assert plan.scores_TE.dtype == torch.float32 and plan.logits_TE.dtype == torch.float32
    ids = plan.expert_ids_TK
    assert ((ids >= -1) & (ids < E)).all(), "expert ids out of range"
    # no expert twice for one token
    routed = ids >= 0
    one_hot = torch.zeros(n, E + 1, dtype=torch.long).scatter_add_(
        1, torch.where(routed, ids, E), torch.ones_like(ids)
    )
    assert (one_hot[:, :E] <= 1).all(), "a token chose the same expert twice"
    w = plan.weights_TK
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert (w[~(plan.keep_TK & plan.selected_TK)] == 0).all(), "weight on a slot that is not computed"
    for name, loss in plan.losses.items():
        assert loss.dim() == 0 and torch.isfinite(loss), f"loss {name} is not a finite scalar"
    norm = router.combine_normalization
    whole = ~plan.dropped_TK.any(-1)  # tokens none of whose choices were dropped
    if plan.token_mask_T is not None:
        whole &= plan.token_mask_T
    sums = w.sum(-1)[whole]
    if isinstance(norm, float):
        torch.testing.assert_close(sums, torch.full_like(sums, norm), atol=tol * max(norm, 1), rtol=0)
    elif norm == "at_most_one":
        assert (w.sum(-1) <= 1 + tol).all()
    if plan.capacity is not None:
        assert (plan.expert_load <= plan.capacity).all(), "capacity exceeded"


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_plan_invariants(name: str, mode: str) -> None:
    maybe_skip(name, "test_plan_invariants")
    router = build(name).train(mode == "train")
    plan = router(tokens(name))
    assert plan.expert_ids_TK.dtype == torch.long and plan.keep_TK.dtype == torch.bool
    check_invariants(router, plan, expect(name).weight_tol)


@pytest.mark.parametrize("name", NAMES)
def test_balanced_by_construction_routers_balance_exactly(name: str) -> None:
    router = build(name).train()
    if not type(router).balanced_by_construction:
        pytest.skip("not balanced by construction")
    E = router.num_experts
    load = router(tokens(name, n=4 * E)).expert_load
    assert load.max() - load.min() <= 1, f"loads {load.tolist()}"


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_router_parameters(name: str) -> None:
    maybe_skip(name, "test_gradients_reach_router_parameters")
    router = build(name).train()
    params = [p for p in router.parameters() if p.requires_grad]
    if not params:
        pytest.skip("router has no trainable parameters")
    torch.manual_seed(3)
    plan = router(tokens(name))
    upstream = torch.rand_like(plan.weights_TK)
    loss = (plan.weights_TK * upstream).sum()
    loss = loss + sum(v for v in plan.losses.values() if v.requires_grad)
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads, "no router parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads), "all router gradients are zero"


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_deterministic(name: str) -> None:
    router = build(name).eval()
    x = tokens(name)
    torch.manual_seed(10)
    a = router(x)
    torch.manual_seed(11)
    b = router(x)
    same_plan(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_padding_tokens_are_excluded_from_losses_and_counts(name: str) -> None:
    maybe_skip(name, "test_padding_tokens_are_excluded_from_losses_and_counts")
    router = build(name).eval()
    x = tokens(name)
    pad = 5 * tokens(name, n=7, seed=2)
    mask = torch.cat([torch.ones(len(x), dtype=torch.bool), torch.zeros(len(pad), dtype=torch.bool)])
    a = router(x)
    b = router(torch.cat([x, pad]), mask)
    E = router.num_experts
    counts = impls.functional.expert_counts
    torch.testing.assert_close(counts(b.expert_ids_TK, E, mask), counts(a.expert_ids_TK, E))
    assert set(a.losses) == set(b.losses)
    for k in a.losses:
        torch.testing.assert_close(
            b.losses[k], a.losses[k], atol=1e-5, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}"
        )
    assert not (b.keep_TK & b.selected_TK)[len(x) :].any(), "a padding token is computed"
    assert (b.weights_TK[len(x) :] == 0).all()
    check_invariants(router, b, expect(name).weight_tol)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_input_routes_like_its_float32_values(name: str) -> None:
    router = build(name).eval()
    x = tokens(name).bfloat16()
    a = router(x)
    b = router(x.float())
    same_plan(a, b)
    assert a.weights_TK.dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_batch_seq_input_equals_flattened_tokens(name: str) -> None:
    router = build(name).eval()
    x = tokens(name, n=2 * 6)
    a = router(x.view(2, 6, D))
    b = router(x, sequence_length=6)
    same_plan(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_causal_routers_ignore_later_tokens(name: str) -> None:
    # causality leaks: a later token must not change an earlier token's routing
    router = build(name).eval()
    if not router.is_causal:
        pytest.skip(f"{name} is not causal in eval mode (routing depends on other tokens)")
    x = tokens(name)
    y = x.clone()
    y[-1] = 10 * torch.randn(D)
    a, b = router(x), router(y)
    n = len(x) - 1
    assert torch.equal(a.expert_ids_TK[:n], b.expert_ids_TK[:n])
    assert torch.equal(a.keep_TK[:n], b.keep_TK[:n])
    torch.testing.assert_close(a.weights_TK[:n], b.weights_TK[:n])


@pytest.mark.parametrize("name", NAMES)
def test_router_state_survives_a_state_dict_round_trip(name: str) -> None:
    a = build(name).eval()
    b = build(name, **{}).eval()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    b.load_state_dict(a.state_dict())
    x = tokens(name)
    same_plan(a(x), b(x))


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_rejected_with_a_clear_error(name: str) -> None:
    router = build(name)
    with pytest.raises(ValueError, match="shape"):
        router(torch.randn(4, D + 1))
    with pytest.raises(TypeError, match="bool"):
        router(torch.randn(4, D), torch.ones(4))


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_cpu_and_cuda_route_identically(name: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    router = build(name).eval()
    x = tokens(name)
    a = router(x)
    b = router.to("cuda")(x.cuda())
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK.cpu())
    torch.testing.assert_close(a.weights_TK, b.weights_TK.cpu(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- catalog links


def _router_classes() -> dict[str, type[impls.Router]]:
    return dict(impls.ROUTERS)


@pytest.fixture(scope="module")
def works() -> dict[str, catalog.Work]:
    return {w.slug: w for w in catalog.load().works}


def _resolve(path: str) -> object:
    import importlib

    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _implements(obj: object, cls: type[impls.Router]) -> bool:
    if isinstance(obj, type):
        return obj is cls
    return isinstance(obj, impls.Preset) and impls.ROUTERS.get(obj.router) is cls


@pytest.mark.parametrize("name", sorted(impls.ROUTERS))
def test_router_papers_are_catalog_works_that_link_back(name: str, works) -> None:
    cls = impls.ROUTERS[name]
    assert cls.papers, f"{cls.__qualname__} names no catalog work"
    for slug in cls.papers:
        assert slug in works, f"{cls.__qualname__}.papers names unknown work {slug!r}"
        impl_objs = [_resolve(p) for p in works[slug].implementations if import_error(p) is None]
        assert any(_implements(o, cls) for o in impl_objs), (
            f"work {slug!r} does not list {cls.__module__}.{cls.__qualname__} (or a preset of it) "
            f"in its implementations: {works[slug].implementations}"
        )


@pytest.mark.parametrize("name", sorted(impls.PRESETS))
def test_preset_papers_are_catalog_works_of_its_router(name: str, works) -> None:
    preset = impls.PRESETS[name]
    cls = impls.ROUTERS[preset.router]
    assert preset.papers, f"preset {name} names no catalog work"
    for slug in preset.papers:
        assert slug in works, f"preset {name} names unknown work {slug!r}"
        assert slug in cls.papers, f"preset {name}'s work {slug!r} is missing from {cls.__qualname__}.papers"


def test_every_catalog_implementation_imports_and_names_its_work(works) -> None:
    problems = []
    for slug, work in works.items():
        for path in work.implementations:
            err = import_error(path)
            if err:
                problems.append(f"{slug}: {err}")
                continue
            obj = _resolve(path)
            if (isinstance(obj, type) and issubclass(obj, (impls.Router, DispatchPolicy))) or isinstance(
                obj, impls.Preset
            ):
                papers = obj.papers
            else:
                problems.append(f"{slug}: {path} is neither a Router class, a Preset nor a dispatch policy")
                continue
            if slug not in papers:
                problems.append(f"{slug}: {path} does not list {slug!r} in papers {papers}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_dispatch_policy_papers_are_catalog_works_that_link_back(name: str, works) -> None:
    cls = POLICIES[name]
    for slug in cls.papers:
        assert slug in works, f"{cls.__qualname__}.papers names unknown work {slug!r}"
        assert any(_resolve(p) is cls for p in works[slug].implementations), (
            f"work {slug!r} does not list {cls.__qualname__} in its implementations"
        )


def test_registry_names_are_unique_and_presets_build() -> None:
    assert not set(impls.ROUTERS) & set(impls.PRESETS)
    for name, preset in impls.PRESETS.items():
        assert preset.router in impls.ROUTERS, f"preset {name} uses unknown router {preset.router!r}"
        assert dataclasses.is_dataclass(preset)
