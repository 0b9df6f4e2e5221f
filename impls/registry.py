"""Registry of routers and paper-named presets.

``ROUTERS`` maps a router's registry name to its class; ``PRESETS`` maps a preset name
(``switch_base``, ``mixtral_8x7b``, ...) to a ``Preset`` that fixes the options a paper used.
``build_router()`` builds either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from impls.router import Router

ROUTERS: dict[str, type[Router]] = {}
PRESETS: dict[str, Preset] = {}


@dataclass(frozen=True, kw_only=True)
class Preset:
    """Options a paper used for a router, under a name taken from the paper.

    Attributes:
        name: registry name (``switch_base``).
        router: registry name of the router class it configures.
        options: router config fields the paper fixes.
        num_experts: the paper's expert count, used when ``build_router()`` gets none.
        layer: MoE-layer settings of the paper (``capacity_factor``, ``num_shared_experts``, ...),
            applied by ``impls.MoELayer`` when built from this preset.
        loss_coefficients: the paper's weights for the plan's auxiliary losses, by loss name
            (pass them to ``impls.RoutingPlan.aux_loss()``; ``impls.MoELayer`` exposes
            them as ``layer.loss_coefficients``).
        papers: catalog slugs of the papers the preset follows.
        description: one-line summary with the citation.
        deviations: where this preset knowingly departs from the paper, and why.
    """

    name: str
    router: str
    options: Mapping[str, Any] = field(default_factory=dict)
    num_experts: int | None = None
    layer: Mapping[str, Any] = field(default_factory=dict)
    loss_coefficients: Mapping[str, float] = field(default_factory=dict)
    papers: tuple[str, ...] = ()
    description: str = ""
    deviations: str = "none known"

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        object.__setattr__(self, "layer", MappingProxyType(dict(self.layer)))
        object.__setattr__(self, "loss_coefficients", MappingProxyType(dict(self.loss_coefficients)))


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: add a router to ``ROUTERS`` under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute 'name' to be registered")
    if name in ROUTERS and ROUTERS[name] is not cls:
        raise ValueError(f"router name {name!r} already registered by {ROUTERS[name].__qualname__}")
    ROUTERS[name] = cls
    return cls


def register_preset(preset: Preset) -> Preset:
    """Add a preset to ``PRESETS``; returns it so modules can keep a named constant."""
    if preset.name in PRESETS and PRESETS[preset.name] != preset:
        raise ValueError(f"preset name {preset.name!r} already registered")
    if preset.name in ROUTERS:
        raise ValueError(f"preset name {preset.name!r} collides with a router name")
    PRESETS[preset.name] = preset
    return preset


def build_router(name: str, *, d_model: int, num_experts: int | None = None, **options: Any) -> Router:
    """Build a router by registry name or preset name.

    Options given here override a preset's options. ``num_experts`` may be omitted for presets
    that fix it (e.g. ``mixtral_8x7b`` has 8).
    """
    if name in PRESETS:
        preset = PRESETS[name]
        cls = ROUTERS[preset.router]
        merged = {**preset.options, **options}
        n = num_experts if num_experts is not None else preset.num_experts
        if n is None:
            raise TypeError(f"preset {name!r} does not fix num_experts; pass num_experts=")
        try:
            return cls(d_model, n, **merged)
        except ValueError as exc:
            paper = f"its paper uses num_experts={preset.num_experts}" if preset.num_experts else "preset"
            fixed = ", ".join(f"{k}={v!r}" for k, v in preset.options.items()) or "no options"
            raise ValueError(
                f"preset {name!r} ({paper} with {fixed}) cannot be built with num_experts={n}"
                f"{' and ' + ', '.join(f'{k}={v!r}' for k, v in options.items()) if options else ''}: "
                f"{exc}; override the conflicting options, e.g. build_router({name!r}, ..., k=...)"
            ) from None
    if name in ROUTERS:
        if num_experts is None:
            raise TypeError(f"router {name!r} needs num_experts=")
        return ROUTERS[name](d_model, num_experts, **options)
    known = ", ".join(sorted([*ROUTERS, *PRESETS]))
    raise KeyError(f"unknown router or preset {name!r}; known: {known}")
