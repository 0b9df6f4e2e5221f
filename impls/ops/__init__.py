"""Solver ops the routers build on, each usable on its own (any device, batched where noted).

* ``impls.ops.sinkhorn`` — entropic optimal transport in the log domain (Sinkhorn scaling);
  used by the Sinkhorn, S-BASE and Selective Sinkhorn routers.
* ``impls.ops.auction`` — exact balanced linear assignment (auction algorithm plus an
  optimality repair); used by the BASE-layers router.
"""

from impls.ops.auction import AssignmentResult, balanced_assignment, balanced_capacities
from impls.ops.sinkhorn import SinkhornResult, sinkhorn

__all__ = ["AssignmentResult", "SinkhornResult", "balanced_assignment", "balanced_capacities", "sinkhorn"]
