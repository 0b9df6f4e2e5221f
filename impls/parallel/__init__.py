"""Expert parallelism on ``torch.distributed`` and system-level load balancing.

* ``impls.parallel.expert_parallel`` — ``ExpertParallel(layer, process_group)``: the routed experts
  of an ``MoELayer`` sharded over ranks, tokens exchanged with ``all_to_all_single`` (uneven
  splits, autograd through every exchange), global or local routing, sharded checkpoints through
  ``torch.distributed.checkpoint`` (``sharded_state_dict()``), and ``data_parallel(model)``:
  ``DistributedDataParallel`` over everything but the sharded experts;
* ``impls.parallel.policies`` — where each routed row is computed: standard EP, Least-Loaded EP,
  FineMoE's token scheduling, ReLibra's replay-guided placement and replication, ReaLB's
  per-rank precision switch;
* ``impls.parallel.simulate`` — the same policies on one process: per-rank loads and bytes moved
  for a routing plan or a saved routing trace;
* ``impls.parallel.fp4`` — emulated NVFP4, for ReaLB's low-precision ranks.
"""

from impls.parallel.expert_parallel import (
    ExpertParallel,
    data_parallel,
    expert_parameter_names,
    full_layer,
    seeded_experts,
)
from impls.parallel.policies import (
    POLICIES,
    Assignment,
    DispatchPolicy,
    FineMoE,
    LeastLoadedEP,
    ReaLB,
    ReLibra,
    StandardEP,
    build_policy,
    fine_moe_placement,
    native_owner,
)
from impls.parallel.simulate import Simulation, counts_from_expert_ids, counts_from_plan, simulate

__all__ = [
    "POLICIES",
    "Assignment",
    "DispatchPolicy",
    "ExpertParallel",
    "FineMoE",
    "LeastLoadedEP",
    "ReLibra",
    "ReaLB",
    "Simulation",
    "StandardEP",
    "build_policy",
    "counts_from_expert_ids",
    "counts_from_plan",
    "data_parallel",
    "expert_parameter_names",
    "fine_moe_placement",
    "full_layer",
    "native_owner",
    "seeded_experts",
    "simulate",
]
