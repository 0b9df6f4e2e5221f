"""The arena's routing metrics, from per-token expert weights on validation text.

Every router's decision is read as ``w [N, E]``: the weight each of ``N`` valid tokens gives each
expert (the combine weights of kept slots for token-choice routers, the combine mass per expert
for Soft MoE, the merge weights for merged experts). From it:

* **load** ``sum_n w[n, e]`` (tokens, or token-equivalents), and its max/mean, coefficient of
  variation (std/mean, population std) and Gini coefficient
  ``sum_i sum_j |l_i - l_j| / (2 E^2 mean(l))`` (0 for equal loads, ``1 - 1/E`` for one expert);
* **top expert** ``argmax_e w[n, e]`` (ties to the lower index) and **stability**, the fraction of
  tokens whose top expert changed between two checkpoints;
* **router entropy** ``-sum_e p log p`` of the router's normalized scores per token (nats) and
  **confidence**, the mean largest score;
* **domain specialization** ``I(domain; expert)`` in bits, from the joint distribution
  ``P(d, e) ∝ sum_{n in d} w[n, e] / sum_e w[n, e]``; it equals ``H(domain)`` when every domain
  has experts of its own, and 0 when routing ignores the domain.
"""

from __future__ import annotations

import math

import torch


def load_stats(load_E: torch.Tensor) -> dict[str, float]:
    """``max_over_mean``, ``cv`` and ``gini`` of a load vector (0/0 cases give 0)."""
    load = load_E.double()
    mean = float(load.mean()) if load.numel() else 0.0
    if mean <= 0:
        return {"max_over_mean": 0.0, "cv": 0.0, "gini": 0.0}
    diffs = (load[:, None] - load[None, :]).abs().sum()
    return {
        "max_over_mean": float(load.max()) / mean,
        "cv": float(load.std(unbiased=False)) / mean,
        "gini": float(diffs) / (2 * load.numel() ** 2 * mean),
    }


def top_expert(w_NE: torch.Tensor) -> torch.Tensor:
    """``long [N]``: each token's largest-weight expert (``argmax`` picks the lowest index on ties)."""
    return w_NE.argmax(-1)


def stability(prev_N: torch.Tensor | None, now_N: torch.Tensor) -> float | None:
    """Fraction of tokens whose top expert changed since the previous checkpoint."""
    if prev_N is None:
        return None
    return float((prev_N != now_N).float().mean())


def entropy_and_confidence(scores_NE: torch.Tensor) -> tuple[float, float]:
    """Mean entropy (nats) and mean largest value of per-token distributions (rows normalized)."""
    p = scores_NE.double().clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    return float(ent.mean()), float(p.max(-1).values.mean())


def mutual_information(domains_N: torch.Tensor, w_NE: torch.Tensor, num_domains: int) -> float:
    """``I(domain; expert)`` in bits, each token spreading one unit over its experts by ``w``."""
    w = w_NE.double().clamp_min(0)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
    joint = torch.zeros(num_domains, w.shape[1], dtype=torch.float64).index_add_(0, domains_N.long(), w)
    total = joint.sum()
    if total <= 0:
        return 0.0
    joint = joint / total
    pd, pe = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    return max(0.0, float((joint[nz] * torch.log2(joint[nz] / (pd @ pe)[nz])).sum()))  # >= 0 up to rounding


def entropy_bits(p: torch.Tensor) -> float:
    p = p.double()
    p = p[p > 0] / p.sum()
    return float(-(p * torch.log2(p)).sum())


def bits_per_byte(loss_nats: float) -> float:
    """Cross-entropy per byte in bits (the model's tokens are bytes)."""
    return loss_nats / math.log(2)
