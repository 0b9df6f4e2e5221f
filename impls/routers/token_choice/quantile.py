r"""Quantile Balancing (Kimi K3, 2026; Su 2026): the expert bias as the dual of the balanced assignment.

Balanced top-$k$ routing of $m$ tokens over $n$ experts is the assignment problem
$\max \sum_{ij} x_{ij} s_{ij}$ subject to $\sum_j x_{ij} = k$ and $\sum_i x_{ij} = q = mk/n$,
$x \in \{0, 1\}$, whose LP relaxation is exact. With free dual variables $\alpha_i$ (tokens) and
$\beta_j$ (experts) the optimum routes token $i$ to the top-$k$ of $s_i - \beta$, and alternating
exact minimization gives (Su, Algorithm 1; `solve_quantile_bias`)

$$
\alpha_i = (k{+}1)\text{-th largest of } (s_{i,:} - \beta), \qquad
\beta_j = (q{+}1)\text{-th largest of } (s_{:,j} - \alpha),
$$

i.e. both are $1 - k/n$ quantiles, one along the experts and one along the tokens: no step size,
no hyperparameter. In training one step of it per batch is taken with the bias $b = -\beta$ of
DeepSeek-V3's selection-only bias (K3 Sec. 2.3.3, Eq. 13-14):

$$
T_i = \operatorname{TopK}(s_i + b^{(t)}), \qquad
\alpha_i = (k{+}1)\text{-th largest of } (s_i + b^{(t)}), \qquad
\hat b_j = -\big[(q{+}1)\text{-th largest of } (s_{:,j} - \alpha)\big], \qquad
b^{(t+1)} = \hat b - \overline{\hat b}.
$$

The new bias **replaces** the old one (the old one enters only through the cutoffs $\alpha$),
and a batch is always routed with the bias solved from earlier batches (never from itself).
The combine weights never see the bias: $p_{ij} = s_{ij} / \sum_{r \in T_i} s_{ir}$ (times the
routed scaling factor), as in DeepSeek-V3.

Two estimators of $\hat b$ (`quantile_mode`):

* `"exact"` (Su's micro-batch compromise, Megatron-Core's form): each training forward computes
  $\hat b$ exactly on its batch; the step uses their average.
* `"histogram"` (K3 App. D, the form used in practice): every forward adds each token's
  required bias $r_{ij} = \alpha_i - s_{ij}$ to a per-expert histogram of `histogram_bins` bins over
  $[b_\min - 1, b_\max + 1]$ (sigmoid or softmax scores lie in $(0, 1)$), and the step decodes the
  exact global-batch quantile from the pooled counts to within one bin width: with $\ell_j$ the
  first bin whose cumulative count reaches $\lceil q \rceil$, $c_j$ the count before it and $h_j$ its
  count, $b_j = b_\min - 1 + (\ell_j + \operatorname{clip}((q - c_j)/h_j, 0, 1))\, w$.

`router.on_optimizer_step(process_group)` (or `impls.step_routers(model, ...)`) applies the update
once per optimizer step: under gradient accumulation the micro-batches pool; with data
parallelism the exact estimates are averaged and the histograms summed over the group, so every
rank keeps the same bias. Evaluation routes with the frozen bias and updates nothing. No auxiliary
loss is used (Megatron-Core asserts it off); the plan reports none.

## Defaults and what is confirmed

From the K3 report (Sec. 2.3.3, App. C-D) and Su's derivation: sigmoid scores, bias on the scores
for selection only, minus the $1 - k/n$ quantile of the margins, mean-centred, replacing the old
bias, 1000 histogram bins, training only. Megatron-Core's implementation (exact per micro-batch,
averaged, optional EMA `quantile_ema`, default 0 = replace) works on the logits instead of the
scores; this router follows the report (scores).

**Deviations.** When $q = mk/n$ is not an integer, $\lfloor q \rfloor$ is used in the exact mode
(Megatron-Core requires $mk$ divisible by $n$). Group-limited routing is not supported (as in
Megatron-Core). The report's optional EMA has no published coefficient (`quantile_ema=0`).

## Usage

```python
import torch, impls

router = impls.build_router("quantile_balancing", d_model=32, num_experts=16, k=2)
for _ in range(20):
    plan = router(torch.randn(64, 32) + 2.0)   # routed with the current bias
    impls.step_routers(router)                 # b <- -quantile(margins), mean-centred
print(router.expert_bias)
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from impls.plan import RoutingPlan
from impls.registry import register_router
from impls.router import RouterConfig, all_reduce_sum
from impls.routers.token_choice.deepseek import DeepSeekConfig, DeepSeekRouter

__all__ = [
    "QuantileBalancingConfig",
    "QuantileBalancingRouter",
    "decode_histogram_quantile",
    "quantile_bias_step",
    "solve_quantile_bias",
]


def _kth_largest_along_tokens(x_TE: torch.Tensor, q_index: torch.Tensor) -> torch.Tensor:
    """``[E]``: the ``(q+1)``-th largest entry of each column (``q_index`` = q, a 0-d long tensor)."""
    ordered = x_TE.sort(dim=0, descending=True).values
    idx = q_index.clamp(0, x_TE.shape[0] - 1).reshape(1, 1).expand(1, x_TE.shape[1])
    return ordered.gather(0, idx)[0]


def quantile_bias_step(
    scores_TE: torch.Tensor, bias_E: torch.Tensor, k: int, token_mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """One step of K3's Eq. 13-14 on a batch: ``b_hat = -(q+1)-th largest (s - alpha)``, mean-centred.

    ``alpha_i`` is the ``(k+1)``-th largest biased score of token ``i``; padding tokens are left
    out (``q = floor(m k / n)`` over the ``m`` valid tokens). No host synchronization.
    """
    s = scores_TE.float()
    T, E = s.shape
    alpha_T1 = (s + bias_E).topk(min(k + 1, E), dim=-1).values[:, -1:]
    margin_TE = s - alpha_T1
    if token_mask_T is not None:
        margin_TE = margin_TE.masked_fill(~token_mask_T[:, None], float("-inf"))
        m = token_mask_T.sum()
    else:
        m = torch.tensor(T, device=s.device)
    q = torch.div(m * k, E, rounding_mode="floor")
    b_hat = -_kth_largest_along_tokens(margin_TE, q)
    return b_hat - b_hat.mean()


def solve_quantile_bias(scores_TE: torch.Tensor, k: int, iterations: int = 50) -> torch.Tensor:
    """Su's Algorithm 1: alternate the two quantile updates; returns the bias ``b = -beta`` (mean-centred).

    Each quantile is taken between its two order statistics (the midpoint of the ``k``-th and
    ``(k+1)``-th largest, of the ``q``-th and ``(q+1)``-th), as ``np.quantile``'s interpolation does
    in Su's demonstration: with the bare order statistic a cutoff can sit exactly on an entry and
    the alternation stalls short of balance. With distinct scores and ``q = mk/n`` an integer,
    top-k of ``s + b`` then gives every expert exactly ``q`` tokens.
    """
    s = scores_TE.float()
    T, E = s.shape
    q = T * k // E
    if not (0 < k < E and 0 < q < T):
        raise ValueError(f"need 0 < k < E and 0 < q = T k / E < T, got T={T}, E={E}, k={k}")
    beta = torch.zeros(E, device=s.device)
    for _ in range(iterations):
        v = (s - beta).topk(k + 1, dim=-1).values
        alpha_T1 = ((v[:, k - 1] + v[:, k]) / 2)[:, None]
        w = (s - alpha_T1).topk(q + 1, dim=0).values
        beta = (w[q - 1] + w[q]) / 2
    b = -beta
    return b - b.mean()


def decode_histogram_quantile(
    hist_EB: torch.Tensor, q: torch.Tensor, low: torch.Tensor, width: torch.Tensor
) -> torch.Tensor:
    """K3 App. D: the value below which ``q`` of each expert's histogrammed entries fall (linear in-bin)."""
    cum = hist_EB.cumsum(-1)
    need = torch.ceil(q).clamp_min(1)
    ell = (cum < need).sum(-1).clamp(max=hist_EB.shape[-1] - 1)  # first bin reaching ceil(q)
    before = torch.where(ell > 0, cum.gather(-1, (ell - 1).clamp_min(0)[:, None])[:, 0], 0.0)
    inside = hist_EB.gather(-1, ell[:, None])[:, 0]
    frac = ((q - before) / inside.clamp_min(1)).clamp(0, 1)
    return low + (ell.to(frac.dtype) + frac) * width


@dataclass(frozen=True, kw_only=True)
class QuantileBalancingConfig(DeepSeekConfig):
    """Options of ``QuantileBalancingRouter``: DeepSeek's, with the bias set by quantile balancing.

    Attributes:
        quantile_mode: ``"exact"`` (per forward, averaged at the step) or ``"histogram"`` (pooled
            global-batch histogram, K3 App. D).
        histogram_bins: bins of the histogram mode (1000 in K3).
        quantile_ema: ``b <- ema * b + (1 - ema) * b_new`` at the step (0 = replace, the default).
    """

    k: int = 2
    score_func: Literal["softmax", "sigmoid", "sqrt_softplus"] = "sigmoid"
    normalize: bool = True
    aux_free_bias: bool = True
    quantile_mode: Literal["exact", "histogram"] = "exact"
    histogram_bins: int = 1000
    quantile_ema: float = 0.0

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if not self.aux_free_bias:
            raise ValueError("quantile balancing sets the selection bias; aux_free_bias must stay True")
        if self.n_group != 1:
            raise ValueError("quantile balancing does not support group-limited routing (n_group must be 1)")
        if self.k >= num_experts:
            raise ValueError(f"quantile balancing needs k < num_experts, got k={self.k}, E={num_experts}")
        if self.quantile_mode not in ("exact", "histogram"):
            raise ValueError(f"quantile_mode must be 'exact' or 'histogram', got {self.quantile_mode!r}")
        if self.quantile_mode == "histogram" and self.score_func not in ("sigmoid", "softmax"):
            raise ValueError("the histogram mode needs scores in (0, 1): score_func 'sigmoid' or 'softmax'")
        if not isinstance(self.histogram_bins, int) or self.histogram_bins < 2:
            raise ValueError(f"histogram_bins must be an int >= 2, got {self.histogram_bins!r}")
        if not 0 <= self.quantile_ema < 1:
            raise ValueError(f"quantile_ema must be in [0, 1), got {self.quantile_ema}")


@register_router
class QuantileBalancingRouter(DeepSeekRouter):
    """Selection-only expert bias from the ``1 - k/n`` quantile of the score margins (no aux loss).

    Kimi Team, "Kimi K3: Open Frontier Intelligence", technical report, arXiv 2607.24653 (2026),
    Sec. 2.3.3 (Eq. 13-14), App. C (the dual problem, Algorithm 1), App. D (global-batch histogram);
    J. Su, "MoE Odyssey 6: optimal assignment for balance", kexue.fm/archives/11619 (2026).
    """

    name = "quantile_balancing"
    papers = ("quantile-balancing",)
    Config = QuantileBalancingConfig
    config: QuantileBalancingConfig
    fp32_buffers = ("expert_bias", "tokens_per_expert", "bias_sum", "bias_count", "histogram", "hist_tokens")

    def __init__(self, d_model: int, num_experts: int, config: RouterConfig | None = None, **options: Any):
        super().__init__(d_model, num_experts, config, **options)
        E, B = num_experts, self.config.histogram_bins if self.config.quantile_mode == "histogram" else 1
        for name, shape in (
            ("bias_sum", (E,)),
            ("bias_count", ()),
            ("histogram", (E, B)),
            ("hist_tokens", ()),
        ):
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float32), persistent=False)

    @property
    def combine_normalization(self) -> float | str | None:
        return self.config.routed_scaling_factor if self.config.normalize else None

    def _histogram_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.expert_bias
        low = b.min() - 1.0
        return low, (b.max() + 1.0 - low) / self.config.histogram_bins

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        plan = super().route(logits_TE, x_TD, token_mask_T)
        cfg = self.config
        if self._counting():
            with torch.no_grad():
                s = self.affinities(plan.logits_TE.detach())
                if cfg.quantile_mode == "exact":
                    self.bias_sum += quantile_bias_step(s, self.expert_bias, cfg.k, token_mask_T)
                    self.bias_count += 1 if token_mask_T is None else token_mask_T.any().float()
                else:
                    alpha_T1 = (s + self.expert_bias).topk(cfg.k + 1, dim=-1).values[:, -1:]
                    need_TE = alpha_T1 - s  # required bias r_ij = alpha_i - s_ij
                    low, width = self._histogram_range()
                    bins_TE = ((need_TE - low) / width).floor().clamp(0, cfg.histogram_bins - 1).long()
                    ones_TE = torch.ones_like(need_TE)
                    if token_mask_T is not None:
                        ones_TE = ones_TE * token_mask_T[:, None]
                    self.histogram.scatter_add_(1, bins_TE.T, ones_TE.T)
                    self.hist_tokens += ones_TE[:, 0].sum() if ones_TE.shape[0] else 0.0
        # no auxiliary loss: the bias alone balances (the z-loss is kept for reporting)
        return dataclasses.replace(plan, losses={"z_loss": plan.losses["z_loss"]})

    @torch.no_grad()
    def update_bias(self, process_group=None) -> torch.Tensor:
        """Set the bias from what the training forwards since the last call collected; returns it."""
        cfg = self.config
        if cfg.quantile_mode == "exact":
            stats = torch.cat([self.bias_sum, self.bias_count[None]])
            all_reduce_sum(stats, process_group)
            total, count = stats[:-1], stats[-1]
            new = total / count.clamp_min(1)
            seen = count > 0
        else:
            stats = torch.cat([self.histogram.flatten(), self.hist_tokens[None]])
            all_reduce_sum(stats, process_group)
            hist = stats[:-1].view_as(self.histogram)
            m = stats[-1]
            low, width = self._histogram_range()
            # b_j is the k/n quantile of r_:,j: q of the m required biases lie below it
            new = decode_histogram_quantile(hist, m * cfg.k / self.num_experts, low, width)
            new = new - new.mean()
            seen = m > 0
        blended = cfg.quantile_ema * self.expert_bias + (1 - cfg.quantile_ema) * new
        blended = blended - blended.mean()
        self.expert_bias.copy_(torch.where(seen, blended, self.expert_bias))
        for buf in (self.bias_sum, self.bias_count, self.histogram, self.hist_tokens, self.tokens_per_expert):
            buf.zero_()
        return self.expert_bias.clone()
