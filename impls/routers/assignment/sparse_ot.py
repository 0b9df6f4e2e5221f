r"""Sparsity-constrained optimal transport routing (Liu, Puigcerver and Blondel, ICLR 2023).

Entropic transport (Sinkhorn) plans are dense: every token gets a little mass on every expert,
so a top-$k$ cut is needed afterwards. Liu et al. constrain the plan itself: among the
regularized transport plans $T \in \mathcal{U}(a, b)$, each column $t_j$ may have at most $k$
non-zeros,

$$
\min_{T \in \mathcal{U}(a, b)} \langle T, C \rangle + \sum_j \Omega(t_j)
\quad \text{s.t.} \quad \lVert t_j \rVert_0 \le k, \qquad
\Omega(t) = \tfrac{\gamma}{2} \lVert t \rVert_2^2 .
$$

The non-convex problem is solved through its **semi-dual**, a smooth concave maximization over
one dual vector $\alpha$:

$$
\max_\alpha \; \alpha^\top a - \sum_j b_j \max_{y \in \Delta, \lVert y \rVert_0 \le k}
\Big( \langle y, \alpha - c_j \rangle - \tfrac{\gamma b_j}{2} \lVert y \rVert^2 \Big),
$$

whose inner maximizer is the **sparse simplex projection** $y_j^\star =
P_{\Delta \cap B_k}\big((\alpha - c_j)/(\gamma b_j)\big)$ — keep the $k$ largest entries, project
them onto the simplex, zero the rest (Kyrillidis et al. 2013) — and whose gradient is
$a - \sum_j b_j y_j^\star$. The plan is $t_j = b_j y_j^\star$: every column has at most $k$
non-zeros and sums to $b_j$ **exactly**; the other marginal holds at the optimum, i.e.
approximately after a few ascent steps.

For routing (the official V-MoE code of the paper), the columns are the tokens ($b_j = 1$), the
rows the experts ($a_e = T/E$, balanced load), the cost is $C = -\operatorname{softmax}(x W)$,
$\gamma = 1$, and $\alpha$ starts at zero and takes 20 Adam steps (learning rate $10^{-2}$). Each
token goes to the (at most $k$) experts of its column of the plan, combined with its softmax
probabilities there (not renormalized). There is no auxiliary loss: balance comes from the
transport. $\alpha$ is solved without gradient; the plan's selection is piecewise constant, and
the combine weights carry the gradient to the gate.

## Defaults and what is confirmed

From the official code (google-research/vmoe, `projects/sparsity_constrained_ot`): cost
$-\operatorname{softmax}$, $\gamma = 1$, 20 Adam steps at $10^{-2}$ from $\alpha = 0$, softmax
combine weights, no auxiliary loss; the paper's own text was not read here, so its equation
numbers are not given. The semi-dual, the sparse projection and the exact column marginal are
checked against POT's `smooth_ot_semi_dual(..., reg_type="sparsity_constrained")`.

**Deviations.** The official code also offers the transposed problem (each *expert* takes at
most $k$ tokens, $k$ its capacity); only the token side (each token at most $k$ experts) is
provided. Whether the Adam iterations are differentiated in the official code is not confirmed;
here they are not.

## Usage

```python
import torch, impls

router = impls.build_router("sparse_ot", d_model=32, num_experts=8, k=2)
plan = router(torch.randn(64, 32))
print((plan.expert_ids_TK >= 0).sum(-1).max(), plan.expert_load)   # <= 2 experts per token
```
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from impls.functional import topk
from impls.plan import RoutingPlan
from impls.registry import Preset, register_preset, register_router
from impls.router import Router, RouterConfig

__all__ = ["SparseOTConfig", "SparseOTRouter", "sparse_ot_semi_dual", "sparse_simplex_projection"]


def sparse_simplex_projection(v_NE: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of ``v`` projected onto the simplex with at most ``k`` non-zeros (Kyrillidis et al. 2013).

    The ``k`` largest entries of a row are projected onto the probability simplex (sort-based,
    Duchi et al. 2008), the others set to zero. Vectorized over the rows.
    """
    top_NK, ids_NK = topk(v_NE, k)  # sorted, descending; ties to the lower index on every device
    css_NK = top_NK.cumsum(-1) - 1.0
    j_K = torch.arange(1, k + 1, device=v_NE.device, dtype=v_NE.dtype)
    support_NK = top_NK - css_NK / j_K > 0
    rho_N = support_NK.sum(-1, keepdim=True).clamp_min(1)
    theta_N = css_NK.gather(-1, rho_N - 1) / rho_N.to(v_NE.dtype)
    y_NK = (top_NK - theta_N).clamp_min(0.0)
    return torch.zeros_like(v_NE).scatter(-1, ids_NK, y_NK)


def sparse_ot_semi_dual(
    cost_TE: torch.Tensor,
    a_E: torch.Tensor,
    k: int,
    *,
    gamma: float = 1.0,
    steps: int = 20,
    lr: float = 1e-2,
    token_mask_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(plan_TE, alpha_E)``: the semi-dual solved by Adam, tokens as the exact (``b = 1``) side.

    ``plan_TE[t]`` sums to 1 with at most ``k`` non-zeros; ``plan.sum(0)`` approaches ``a_E``.
    Padding rows (``token_mask_T`` False) get an all-zero plan. No gradient flows through ``alpha``.
    """
    cost_TE = cost_TE.detach()
    valid_T1 = None if token_mask_T is None else token_mask_T[:, None].to(cost_TE.dtype)
    alpha_E = torch.zeros_like(a_E)
    m_E, v_E = torch.zeros_like(a_E), torch.zeros_like(a_E)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, steps + 1):  # ascent iterations on one [E] vector, not a loop over tokens
        y_TE = sparse_simplex_projection((alpha_E - cost_TE) / gamma, k)
        if valid_T1 is not None:
            y_TE = y_TE * valid_T1
        grad_E = y_TE.sum(0) - a_E  # gradient of the negated semi-dual
        m_E = beta1 * m_E + (1 - beta1) * grad_E
        v_E = beta2 * v_E + (1 - beta2) * grad_E * grad_E
        m_hat, v_hat = m_E / (1 - beta1**step), v_E / (1 - beta2**step)
        alpha_E = alpha_E - lr * m_hat / (v_hat.sqrt() + eps)
    plan_TE = sparse_simplex_projection((alpha_E - cost_TE) / gamma, k)
    if valid_T1 is not None:
        plan_TE = plan_TE * valid_T1
    return plan_TE, alpha_E


@dataclass(frozen=True, kw_only=True)
class SparseOTConfig(RouterConfig):
    """Options of ``SparseOTRouter``.

    Attributes:
        k: most experts per token (non-zeros per column of the plan).
        gamma: strength of the squared-L2 regularization.
        steps: Adam steps on the semi-dual (20 in the official code).
        lr: Adam learning rate (1e-2).
    """

    k: int = 2
    gamma: float = 1.0
    steps: int = 20
    lr: float = 1e-2

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@register_router
class SparseOTRouter(Router):
    """Routing by a transport plan with at most ``k`` experts per token (semi-dual, sparse projection).

    Liu, Puigcerver, Blondel, "Sparsity-Constrained Optimal Transport", ICLR 2023,
    arXiv 2209.15466 (the sparsity-constrained problem, its semi-dual, and the sparse MoE
    experiments; equation numbers not checked).
    """

    name = "sparse_ot"
    papers = ("sparsity-constrained-ot",)
    causal = False  # the plan couples every token of the batch
    Config = SparseOTConfig
    config: SparseOTConfig

    @property
    def max_experts_per_token(self) -> int:
        return self.config.k

    @property
    def combine_normalization(self) -> str:
        return "at_most_one"

    def route(self, logits_TE, x_TD, token_mask_T) -> RoutingPlan:
        cfg, E = self.config, self.num_experts
        probs_TE = torch.softmax(logits_TE, dim=-1)
        n_valid = (
            torch.tensor(float(logits_TE.shape[0]), device=logits_TE.device)
            if token_mask_T is None
            else token_mask_T.sum().float()
        )
        a_E = (n_valid / E).expand(E).clone()
        plan_TE, alpha_E = sparse_ot_semi_dual(
            -probs_TE, a_E, cfg.k, gamma=cfg.gamma, steps=cfg.steps, lr=cfg.lr, token_mask_T=token_mask_T
        )
        top_TK, ids_TK = topk(plan_TE, cfg.k)
        used_TK = top_TK > 0
        ids_TK = torch.where(used_TK, ids_TK, -1)
        w_TK = torch.where(used_TK, probs_TE.gather(1, ids_TK.clamp_min(0)), torch.zeros_like(top_TK))
        return RoutingPlan(
            ids_TK, w_TK, used_TK, plan_TE, logits_TE, {}, token_mask_T, info={"alpha": alpha_E}
        )


SPARSITY_CONSTRAINED_OT = register_preset(
    Preset(
        name="sparsity_constrained_ot",
        router="sparse_ot",
        options={"k": 2, "gamma": 1.0, "steps": 20, "lr": 1e-2},
        papers=("sparsity-constrained-ot",),
        description=(
            "Sparsity-constrained OT routing (Liu et al., ICLR 2023, arXiv 2209.15466), V-MoE code: cost "
            "-softmax, gamma 1, 20 Adam steps on the semi-dual, at most k = 2 experts per token."
        ),
        deviations=(
            "k = 2 is V-MoE's usual top-2; the paper's k for its tables is not confirmed. Only the token "
            "side of the official code (each token at most k experts) is provided."
        ),
    )
)
