r"""Hash layers: each token goes to the expert a fixed hash of its token id names; no router at all.

Roller, Sukhbaatar, Szlam & Weston, "Hash Layers For Large Sparse Models", NeurIPS 2021,
arXiv 2106.04426 (Sec. 3; official code: ParlAI `projects/params_vs_compute/hash_ladder`).

A hash layer replaces the learned gate of a sparse feed-forward layer with a table $h$ from the
vocabulary to the $E$ experts, fixed before training:

$$
y_t = \operatorname{FFN}_{h(v_t)}(x_t),
$$

where $v_t$ is the **id of the current input token** (the same id at every layer that hashes) and
$x_t$ its hidden state. One expert per token, weight 1, no gate parameters, no balancing loss: a
token's expert is a pure function of its id, and balance depends only on the table. The tables
(`hash=`):

* `"random"` — every vocabulary id draws a bucket uniformly at random (the official code: a seeded
  table over the vocabulary, built once);
* `"balanced"` — built from unigram counts of the training data: ids in order of decreasing count,
  each to the bucket whose running load is smallest (greedy; `HashRouter.balanced(counts, ...)`).
  Every bucket then ends within the count of one token type of every other (exactly equal loads
  are impossible when one type alone exceeds $1/E$ of the data, as the paper notes);
* `"clustered"` — $k$-means with $k = E$ on token embeddings from a trained model, one cluster per
  expert, so that similar tokens share an expert (`HashRouter.clustered(embeddings, ...)`);
* `"dispersed"` — the same clusters, each spread evenly over all experts, so that similar tokens
  are *split* across experts (the paper's contrast to the clustered hash).

The paper finds balanced and random hashing of the current token best; clustered hashes route
worse. Routing needs `token_ids` (``long``, shaped like the tokens) as an explicit input:
`router(x, token_ids=ids)`, `MoELayer(...)(x, token_ids=ids)`.

Not included: the paper's bigram, previous-token, position and oracle-future hashes and MultiHash
(several hashes over slices of the hidden dimension). The official code's extra residual inside
each expert is a property of its feed-forward block, not of the routing, and is not reproduced.
$k$-means runs SciPy's `kmeans2` (k-means++ initialization, seeded).

## Usage

```python
import torch, impls
from impls.routers.non_trainable.hash_layers import HashRouter

router = impls.build_router("hash", d_model=16, num_experts=4, vocab_size=100)
ids = torch.randint(0, 100, (2, 9))
plan = router(torch.randn(2, 9, 16), token_ids=ids)
assert torch.equal(plan.expert_ids_TK[:, 0], router.table_V[ids.reshape(-1)])
counts = torch.tensor([50, 30, 20, 20, 10, 10, 5, 5])        # unigram counts of an 8-word vocabulary
balanced = HashRouter.balanced(counts, d_model=16, num_experts=3)
print(balanced.bucket_loads(counts))                         # tensor([50., 50., 50.])
```
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Literal

import torch

from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import RouterConfig
from impls.routers.non_trainable._gateless import GatelessRouter

__all__ = ["HASH_LAYER", "HashConfig", "HashRouter", "balanced_table", "clustered_table", "random_table"]

HashKind = Literal["random", "balanced", "clustered", "dispersed"]


def random_table(vocab_size: int, num_experts: int, seed: int) -> torch.Tensor:
    """``long [V]``: a uniformly random bucket per vocabulary id, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_experts, (vocab_size,), generator=g)


def balanced_table(counts_V: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``long [V]``: ids by decreasing count, each to the least-loaded bucket (ties: lower bucket, lower id).

    A one-off build over the vocabulary (a heap, ``O(V log E)``), not part of routing.
    """
    counts = counts_V.detach().to("cpu", torch.float64)
    order = sorted(range(len(counts)), key=lambda v: (-float(counts[v]), v))
    heap = [(0.0, e) for e in range(num_experts)]
    table = [0] * len(counts)
    for v in order:
        load, e = heapq.heappop(heap)
        table[v] = e
        heapq.heappush(heap, (load + float(counts[v]), e))
    return torch.tensor(table, dtype=torch.long)


def clustered_table(
    embeddings_VD: torch.Tensor, num_experts: int, seed: int, dispersed: bool = False
) -> torch.Tensor:
    """``long [V]``: the k-means cluster (``k = E``) of each id's embedding, or, ``dispersed``, each
    cluster's ids spread round-robin over all experts."""
    import numpy as np
    from scipy.cluster.vq import kmeans2

    data = embeddings_VD.detach().to("cpu", torch.float64).numpy()
    _, labels = kmeans2(data, num_experts, minit="++", seed=np.random.default_rng(seed))
    labels_V = torch.from_numpy(labels.astype("int64"))
    if not dispersed:
        return labels_V
    # rank of each id inside its cluster (stable by id), then spread: bucket = (cluster + rank) mod E
    order = torch.argsort(labels_V * len(labels_V) + torch.arange(len(labels_V)))
    sorted_labels = labels_V[order]
    starts = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    rank = torch.empty_like(labels_V)
    rank[order] = torch.arange(len(labels_V)) - starts
    return (labels_V + rank) % num_experts


@dataclass(frozen=True, kw_only=True)
class HashConfig(RouterConfig):
    """Options of ``HashRouter``.

    Attributes:
        vocab_size: number of token ids the table covers.
        hash: which table (``"random"`` here; the others via ``HashRouter.balanced`` / ``.clustered``).
        seed: seed of the random table (and of k-means).
    """

    vocab_size: int = 0
    hash: HashKind = "random"
    seed: int = 42

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.k != 1:
            raise ValueError("a hash layer sends each token to one expert (k=1)")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(
                f"vocab_size must be an int >= 1 (the token ids the table covers), got {self.vocab_size!r}"
            )
        if self.hash not in ("random", "balanced", "clustered", "dispersed"):
            raise ValueError(
                f"hash must be 'random', 'balanced', 'clustered' or 'dispersed', got {self.hash!r}"
            )


@register_router
class HashRouter(GatelessRouter):
    """Hash layer (Roller et al., NeurIPS 2021): expert = table[token id], weight 1, no parameters."""

    name = "hash"
    papers = ("hash-layers",)
    causal = True
    Config = HashConfig
    config: HashConfig
    routing_inputs = ("token_ids",)

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        config: RouterConfig | None = None,
        *,
        table: torch.Tensor | None = None,
        **options: Any,
    ):
        super().__init__(d_model, num_experts, config, **options)
        cfg = self.config
        if table is None:
            if cfg.hash != "random":
                raise ValueError(
                    f"hash={cfg.hash!r} is built from data: use HashRouter.balanced(counts, ...) or "
                    "HashRouter.clustered(embeddings, ...)"
                )
            table = random_table(cfg.vocab_size, num_experts, cfg.seed)
        table = torch.as_tensor(table)
        if table.shape != (cfg.vocab_size,) or table.dtype != torch.long:
            raise ValueError(f"table must be long [{cfg.vocab_size}], got {table.dtype} {list(table.shape)}")
        if table.numel() and (int(table.min()) < 0 or int(table.max()) >= num_experts):
            raise ValueError(f"table entries must be experts in [0, {num_experts})")
        self.register_buffer("table_V", table.clone())

    @classmethod
    def balanced(
        cls, counts_V: torch.Tensor, *, d_model: int, num_experts: int, **options: Any
    ) -> HashRouter:
        """The balanced hash from unigram counts ``counts_V`` (one per vocabulary id)."""
        counts_V = torch.as_tensor(counts_V)
        if counts_V.dim() != 1 or (counts_V < 0).any():
            raise ValueError(
                f"counts must be a 1-D tensor of non-negative counts, got shape {list(counts_V.shape)}"
            )
        table = balanced_table(counts_V, num_experts)
        return cls(d_model, num_experts, vocab_size=len(counts_V), hash="balanced", table=table, **options)

    @classmethod
    def clustered(
        cls,
        embeddings_VD: torch.Tensor,
        *,
        d_model: int,
        num_experts: int,
        dispersed: bool = False,
        seed: int = 42,
        **options: Any,
    ) -> HashRouter:
        """The clustered (or dispersed) hash from trained token embeddings ``[V, D_emb]``."""
        if embeddings_VD.dim() != 2 or embeddings_VD.shape[0] < num_experts:
            raise ValueError(
                f"embeddings must be [vocab, dim] with at least {num_experts} rows, "
                f"got {list(embeddings_VD.shape)}"
            )
        table = clustered_table(embeddings_VD, num_experts, seed, dispersed)
        kind = "dispersed" if dispersed else "clustered"
        return cls(
            d_model,
            num_experts,
            vocab_size=embeddings_VD.shape[0],
            hash=kind,
            seed=seed,
            table=table,
            **options,
        )

    def input_ranges(self) -> dict[str, int]:
        return {"token_ids": self.config.vocab_size}

    def bucket_loads(self, counts_V: torch.Tensor) -> torch.Tensor:
        """``float [E]``: tokens each expert would receive on a corpus with unigram counts ``counts_V``."""
        loads = torch.zeros(self.num_experts, dtype=torch.float64)
        return loads.index_add_(0, self.table_V.cpu(), torch.as_tensor(counts_V, dtype=torch.float64)).float()

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        return self.one_expert_plan(self.table_V[self.inputs["token_ids"]], logits_TE, token_mask_T)


HASH_LAYER = register_preset(
    Preset(
        name="hash_layer",
        router="hash",
        options={"hash": "random", "seed": 42},
        num_experts=32,
        papers=("hash-layers",),
        description=(
            "Hash layer (Roller et al., NeurIPS 2021; ParlAI `hash_ladder` defaults): a seeded random table "
            "from token ids to 32 experts. Pass vocab_size."
        ),
    )
)
