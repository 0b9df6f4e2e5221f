"""MoE Atlas reference routers: faithful, tested, device-agnostic PyTorch implementations.

>>> import torch, impls
>>> router = impls.build_router("switch_base", d_model=16, num_experts=4)
>>> plan = router(torch.randn(8, 16))
>>> plan.expert_ids_TK.shape
torch.Size([8, 1])

Files: ``impls.plan`` (the routing plan), ``impls.router`` (base class),
``impls.functional`` (capacity and loss math), ``impls.registry`` (names and presets),
``impls.routers`` (one module per router family), ``impls.layer`` (the MoE layer:
dispatch, grouped experts, combine), ``impls.oracle`` (the slow loop it is tested against),
``impls.balance`` (global-batch balance loss across micro-batches and ranks).
"""

from impls import routers  # noqa: F401  (registers every router family)
from impls.balance import GlobalLoadBalance
from impls.functional import capacity_keep, expert_capacity, load_balance_loss, z_loss
from impls.layer import GroupedExperts, MoELayer
from impls.plan import DIAGNOSTICS, MergePlan, RoutingPlan, SlotPlan
from impls.registry import PRESETS, ROUTERS, Preset, build_router, register_preset, register_router
from impls.router import Router, RouterConfig, SequenceRouter, step_routers

__all__ = [
    "DIAGNOSTICS",
    "PRESETS",
    "ROUTERS",
    "GlobalLoadBalance",
    "GroupedExperts",
    "MergePlan",
    "MoELayer",
    "Preset",
    "Router",
    "RouterConfig",
    "RoutingPlan",
    "SequenceRouter",
    "SlotPlan",
    "build_router",
    "capacity_keep",
    "expert_capacity",
    "load_balance_loss",
    "register_preset",
    "register_router",
    "step_routers",
    "z_loss",
]
