"""What the router pages show, read from ``impls`` and measured on CPU at build time.

A *family* is one module ``impls/routers/<group>/<family>.py`` (``group`` a branch of the survey's
gating taxonomy, ``impls.routers.GROUPS``): its docstring explains the method, its classes are the
routers registered in ``impls.ROUTERS``, and the presets whose router is one of them belong to it.
``discover()`` returns no families while ``impls`` registers none yet.

Measured behaviour: every router and preset of a family routes one fixed, seeded, deliberately
skewed batch (``MeasureSetup``) in training mode, and the page reports the plan's own
diagnostics plus the median forward time.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_FENCE_RE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)[^\n]*\n"
    r"(?P<body>.*?)^(?P=indent)(?P=ticks)[ \t]*$",
    re.M | re.S,
)


@dataclass(frozen=True)
class MeasureSetup:
    """The synthetic batch every router routes for its page.

    Tokens are drawn around ``len(cluster_weights)`` random centres with unequal frequencies,
    so a learned-free (randomly initialised) gate already sees a skewed token distribution:
    the interesting numbers are how each router balances it.
    """

    tokens: int = 2048
    d_model: int = 64
    num_experts: int = 8
    seed: int = 0
    cluster_weights: tuple[float, ...] = (0.55, 0.25, 0.15, 0.05)
    centre_scale: float = 1.0
    repeats: int = 5
    vocab_size: int = 1000
    """Vocabulary of the token ids given to routers that hash or map them (Zipf-distributed ids)."""

    def describe(self) -> str:
        w = ", ".join(f"{p:.0%}" for p in self.cluster_weights)
        return (
            f"T = {self.tokens} tokens, D = {self.d_model}, E = {self.num_experts} experts for the "
            f"routers and the paper's E for presets that fix one, seed "
            f"{self.seed}; tokens drawn around {len(self.cluster_weights)} random centres with "
            f"frequencies {w} (a skewed batch), gate initialised by PyTorch's default from the same "
            f"seed, training mode, no gradient; forward time is the median of {self.repeats} runs "
            f"after one warm-up, on one thread of this build machine's CPU. Routers that read labels get "
            f"each token's centre as its domain, task, language or attribute label (modulo the "
            f"router's label count), and token ids drawn from a Zipf law over a {self.vocab_size}-word "
            f"vocabulary; sequence-level routers (Soft MoE, merged experts) see the batch as one sequence"
        )

    def batch_and_labels(self) -> tuple[Any, Any]:
        """``(x [T, D], centre index [T])``."""
        import torch

        g = torch.Generator().manual_seed(self.seed)
        k = len(self.cluster_weights)
        centres = torch.randn(k, self.d_model, generator=g) * self.centre_scale
        probs = torch.tensor(self.cluster_weights, dtype=torch.float32)
        which = torch.multinomial(probs, self.tokens, replacement=True, generator=g)
        return centres[which] + torch.randn(self.tokens, self.d_model, generator=g), which

    def batch(self) -> Any:
        return self.batch_and_labels()[0]

    def routing_inputs(self, router: Any, labels: Any) -> dict[str, Any]:
        """The integer inputs ``router`` needs (``router.routing_inputs``), built from the batch."""
        import torch

        out = {}
        bounds = router.input_ranges()
        for name in router.routing_inputs:
            bound = bounds.get(name, self.vocab_size)
            if name == "token_ids":
                g = torch.Generator().manual_seed(self.seed + 1)
                zipf = 1.0 / torch.arange(1, bound + 1, dtype=torch.float64)
                out[name] = torch.multinomial(zipf.float(), self.tokens, replacement=True, generator=g)
            else:
                out[name] = labels % bound
        return out


@dataclass(frozen=True)
class Measurement:
    name: str
    kind: str  # "router" or "preset"
    num_experts: int = 0
    load: tuple[float, ...] = ()
    load_max_over_mean: float = 0.0
    fraction_dropped: float = 0.0
    experts_per_token: float = 0.0
    router_confidence: float = 0.0
    forward_ms: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class RouterEntry:
    name: str
    cls_name: str
    path: str
    """Dotted import path, ``impls.routers.<family>.<Class>``."""
    papers: tuple[str, ...]
    causal: bool
    plan_type: str = "tokens"
    """``"tokens"`` (a ``RoutingPlan``), ``"slots"`` (Soft MoE) or ``"merge"`` (merged experts)."""


@dataclass(frozen=True)
class PresetEntry:
    name: str
    router: str
    options: dict[str, Any]
    num_experts: int | None
    papers: tuple[str, ...]
    description: str
    deviations: str
    paths: tuple[str, ...] = ()
    """Dotted paths of module constants holding the preset
    (``impls.routers.token_choice.switch.SWITCH_BASE``)."""


@dataclass(frozen=True)
class RouterFamily:
    name: str
    group: str
    """Subpackage of ``impls.routers`` (a branch of the survey's gating taxonomy)."""
    module: str
    source_rel: str
    """Path of the module relative to the repository (``impls/routers/token_choice/switch.py``)."""
    source: str
    summary: str
    body: str
    routers: tuple[RouterEntry, ...]
    presets: tuple[PresetEntry, ...]
    api_members: tuple[str, ...]
    measurements: tuple[Measurement, ...] = field(default=())

    @property
    def title(self) -> str:
        """Page title: the docstring's summary up to its first colon, without the final period."""
        head = self.summary.split(": ", 1)[0].rstrip(".").strip()
        return head or self.name

    @property
    def lead(self) -> str:
        """What follows the colon in the summary (``""`` when it has none)."""
        parts = self.summary.split(": ", 1)
        return parts[1].strip() if len(parts) == 2 else ""

    @property
    def papers(self) -> tuple[str, ...]:
        out: dict[str, None] = {}
        for r in self.routers:
            out.update(dict.fromkeys(r.papers))
        for p in self.presets:
            out.update(dict.fromkeys(p.papers))
        return tuple(out)

    @property
    def snippets(self) -> list[str]:
        return usage_snippets(self.summary + "\n\n" + self.body)


def usage_snippets(doc: str) -> list[str]:
    """Bodies of the fenced ``python`` blocks of a Markdown docstring, in order."""
    out = []
    for m in _FENCE_RE.finditer(doc):
        if m.group("lang").lower() in ("python", "py", "python3"):
            body = m.group("body")
            indent = m.group("indent")
            lines = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in body.splitlines()]
            out.append("\n".join(lines).rstrip() + "\n")
    return out


def family_of(module: str) -> tuple[str, str] | None:
    """``(group, family)`` of a module ``impls.routers.<group>.<family>``, else ``None``."""
    prefix = "impls.routers."
    if not module.startswith(prefix):
        return None
    parts = module[len(prefix) :].split(".")
    return (parts[0], parts[1]) if len(parts) >= 2 else None


def _api_members(mod: Any) -> tuple[str, ...]:
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [
            n
            for n, obj in vars(mod).items()
            if not n.startswith("_")
            and (inspect.isclass(obj) or inspect.isfunction(obj))
            and getattr(obj, "__module__", None) == mod.__name__
        ]

    def line(n: str) -> int:
        try:
            return inspect.getsourcelines(getattr(mod, n))[1]
        except (TypeError, OSError):
            return 10**9

    return tuple(f"{mod.__name__}.{n}" for n in sorted(names, key=line))


def discover(
    measure: bool = True, setup: MeasureSetup | None = None, repo: Path | None = None
) -> list[RouterFamily]:
    """All router families registered in ``impls``, in name order; ``[]`` if there are none.

    Importing ``impls`` is not optional: a broken package fails the build. What may be missing
    (while the registry is being filled) is the registry itself or any entry in it.
    """
    import impls

    routers: dict[str, type] = dict(getattr(impls, "ROUTERS", {}) or {})
    presets: dict[str, Any] = dict(getattr(impls, "PRESETS", {}) or {})
    repo = repo or Path(impls.__file__).resolve().parent.parent
    by_family: dict[str, list[tuple[str, type]]] = {}
    group_of: dict[str, str] = {}
    for name, cls in sorted(routers.items()):
        where = family_of(cls.__module__)
        if where is None:
            log.warning(
                "router %r lives in %s, outside impls.routers.<group>; no page for it", name, cls.__module__
            )
            continue
        group, fam = where
        if group_of.setdefault(fam, group) != group:
            raise ValueError(
                f"router family name {fam!r} is used in two groups: {group_of[fam]!r}, {group!r}"
            )
        by_family.setdefault(fam, []).append((name, cls))
    families = []
    for fam, members in sorted(by_family.items()):
        module_name = f"impls.routers.{group_of[fam]}.{fam}"
        mod = importlib.import_module(module_name)
        src_path = Path(inspect.getsourcefile(mod) or mod.__file__)
        try:
            source_rel = src_path.resolve().relative_to(repo).as_posix()
        except ValueError:
            source_rel = src_path.name
        doc = inspect.getdoc(mod) or ""
        summary, _, body = doc.partition("\n")
        router_names = {n for n, _ in members}
        consts: dict[int, list[str]] = {}
        for const, obj in vars(mod).items():
            if not const.startswith("_"):
                consts.setdefault(id(obj), []).append(f"{module_name}.{const}")
        fam_presets = tuple(
            PresetEntry(
                name=p.name,
                router=p.router,
                options=dict(p.options),
                num_experts=getattr(p, "num_experts", None),
                papers=tuple(p.papers),
                description=p.description,
                deviations=p.deviations,
                paths=tuple(consts.get(id(p), ())),
            )
            for _, p in sorted(presets.items())
            if p.router in router_names
        )
        entries = tuple(
            RouterEntry(
                name=n,
                cls_name=cls.__qualname__,
                path=f"{cls.__module__}.{cls.__qualname__}",
                papers=tuple(getattr(cls, "papers", ())),
                causal=bool(getattr(cls, "causal", False)),
                plan_type=str(getattr(cls, "plan_type", "tokens")),
            )
            for n, cls in members
        )
        family = RouterFamily(
            name=fam,
            group=group_of[fam],
            module=module_name,
            source_rel=source_rel,
            source=src_path.read_text(encoding="utf-8"),
            summary=summary.strip(),
            body=body.strip(),
            routers=entries,
            presets=fam_presets,
            api_members=_api_members(mod),
        )
        if measure:
            family = _with_measurements(family, setup or MeasureSetup())
        families.append(family)
    return families


def _with_measurements(family: RouterFamily, setup: MeasureSetup) -> RouterFamily:
    from dataclasses import replace

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # comparable timings, immune to a busy machine's thread contention
    try:
        runs = [measure_router(r.name, "router", setup) for r in family.routers]
        runs += [measure_router(p.name, "preset", setup, p.num_experts) for p in family.presets]
    finally:
        torch.set_num_threads(threads)
    return replace(family, measurements=tuple(runs))


def _build_options(name: str, setup: MeasureSetup) -> dict[str, Any]:
    """Options a router needs from outside that its preset does not fix (a vocabulary size)."""
    import dataclasses

    import impls

    preset = impls.PRESETS.get(name)
    cls = impls.ROUTERS[preset.router if preset else name]
    fixed = dict(preset.options) if preset else {}
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    return {"vocab_size": setup.vocab_size} if "vocab_size" in fields and "vocab_size" not in fixed else {}


def measure_router(name: str, kind: str, setup: MeasureSetup, num_experts: int | None = None) -> Measurement:
    """Route the setup's batch with router or preset ``name``; errors are reported, not raised.

    ``num_experts`` overrides the setup's expert count (presets run with their paper's count,
    since options such as DeepSeek's expert groups only make sense there).
    """
    import torch

    import impls

    E = num_experts or setup.num_experts
    try:
        torch.manual_seed(setup.seed)
        with warnings.catch_warnings():  # e.g. "not causal": advice for decoders, not an error here
            warnings.simplefilter("ignore", UserWarning)
            router = impls.build_router(
                name, d_model=setup.d_model, num_experts=E, **_build_options(name, setup)
            )
        router.train()
        x_TD, labels = setup.batch_and_labels()
        inputs = setup.routing_inputs(router, labels)
        times = []
        with torch.no_grad():
            for i in range(setup.repeats + 1):
                torch.manual_seed(setup.seed)  # same jitter/noise every run
                t0 = time.perf_counter()
                plan = router(x_TD, **inputs)
                if i:
                    times.append((time.perf_counter() - t0) * 1e3)
        load = plan.expert_load.float()
        mean = float(load.mean())
        return Measurement(
            name=name,
            kind=kind,
            num_experts=E,
            load=tuple(float(v) for v in load),
            load_max_over_mean=float(load.max()) / mean if mean > 0 else float("nan"),
            fraction_dropped=float(plan.fraction_dropped),
            experts_per_token=float(plan.experts_per_token),
            router_confidence=float(plan.router_confidence),
            forward_ms=statistics.median(times),
        )
    except Exception as exc:
        log.warning("could not measure %s %r: %s: %s", kind, name, type(exc).__name__, exc)
        return Measurement(name=name, kind=kind, num_experts=E, error=f"{type(exc).__name__}: {exc}")


def tested_routers(families: list[RouterFamily], tests_dir: Path) -> set[str]:
    """Registry names of the routers the test suite names (by registry name in quotes or class name)."""
    files = [p for p in sorted(tests_dir.glob("test_*.py")) if not p.name.startswith("test_site_")]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    blob = "\n".join(texts)
    out = set()
    for fam in families:
        for r in fam.routers:
            if re.search(rf"\b{re.escape(r.cls_name)}\b", blob) or re.search(
                rf"[\"']{re.escape(r.name)}[\"']", blob
            ):
                out.add(r.name)
    return out
