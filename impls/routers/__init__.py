"""Router families, grouped as the gating taxonomy of the MoE survey (Cai et al. 2024, Sec. 3.1).

One subpackage per branch of the taxonomy, one module per router family inside it
(``impls/routers/<group>/<family>.py``). Importing this package registers every router and
preset. ``GROUPS`` names each subpackage's taxonomy node in the catalog.

=================  ==============================  =============================================
subpackage         taxonomy node                   families
=================  ==============================  =============================================
``dense``          Dense                           every expert is weighted
``token_choice``   Sparse · Token-Choice           a trained gate picks experts per token
``non_trainable``  Sparse · Non-trainable          hash, random and metadata (domain, task) rules
``expert_choice``  Sparse · Expert-Choice          experts pick their tokens
``token_merging``  Soft · Token Merging            experts process mixtures of tokens
``expert_merging`` Soft · Expert Merging           one merged expert per example or segment
``assignment``     Load Balancing (extension)      transport and assignment problems
=================  ==============================  =============================================
"""

from __future__ import annotations

import importlib
import pkgutil

#: subpackage -> (title, catalog taxonomy node id), in the survey's order.
GROUPS: dict[str, tuple[str, str]] = {
    "dense": ("Dense", "dense"),
    "token_choice": ("Sparse: Token-Choice", "token-choice"),
    "non_trainable": ("Sparse: Non-trainable Token-Choice", "non-trainable-token-choice"),
    "expert_choice": ("Sparse: Expert-Choice", "expert-choice-gating"),
    "token_merging": ("Soft: Token Merging", "token-merging"),
    "expert_merging": ("Soft: Expert Merging", "expert-merging"),
    "assignment": ("Load Balancing: transport and assignment", "load-balancing"),
}


def _import_families() -> None:
    for group in pkgutil.iter_modules(__path__):
        if group.name.startswith("_"):
            continue
        if not group.ispkg or group.name not in GROUPS:
            raise ImportError(f"impls.routers.{group.name}: not a taxonomy group; known: {sorted(GROUPS)}")
        pkg = importlib.import_module(f"{__name__}.{group.name}")
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{pkg.__name__}.{info.name}")


_import_families()
