r"""Expert-router coupling (ERC) loss (Lv et al., ICLR 2026): router rows as proxy tokens for the experts.

A top-$k$ router's weight $R \in \mathbb{R}^{n \times D}$ holds one row per expert, and routing sends
a token to the experts whose rows it aligns with. ERC ties those rows to what the experts actually
respond to: each row, slightly perturbed, is used as a **proxy token** for its expert's cluster
and passed through every expert's gate projection $W_g^j$,

$$
\tilde R_i = R_i \odot \delta_i, \quad \delta_i \sim \mathcal{U}(1 - \epsilon_i, 1 + \epsilon_i), \quad
\epsilon_i = \frac{\min_{j \ne i} \lVert R_i - R_j \rVert}{2 \lVert R_i \rVert}, \qquad
M_{ij} = \lVert \tilde R_i W_g^j \rVert_2,
$$

and the $n \times n$ activations are constrained so that each expert responds to its own proxy
more strongly (by a factor $\alpha$) than any other expert does, and than it does to other
proxies:

$$
\mathcal{L}_\text{ERC} = \frac{1}{n^2} \sum_i \sum_{j \ne i}
\big[\max(M_{ij} - \alpha M_{ii}, 0) + \max(M_{ji} - \alpha M_{ii}, 0)\big].
$$

The noise bound keeps every perturbed row closer to its own expert's row than to any other. The
loss costs $n$ rows through the experts' first projections, independent of the batch.
`ERCRouter` (`erc`) is the softmax top-$k$ router with `coupling_loss(experts)`; for SwiGLU
experts $W_g^j$ is the gate half of the input projection, for GELU experts the input projection.

## Defaults and what is confirmed

The paper's text could not be read for this implementation: the loss, the noise bound and the
best $\alpha$ (1 for its 3B model with 64 experts, 0.5 for the 15B model with 256) follow two
consistent secondary readings; it is computed every step in every layer. The loss weight is not
confirmed (the arena uses 1). **Deviation:** the noise is off in `eval()` (deterministic).

## Usage

```python
import torch, impls

layer = impls.MoELayer(64, 128, router="erc", num_experts=16, k=2, activation="swiglu")
out, plan = layer(torch.randn(2, 10, 64))
loss = out.pow(2).mean() + layer.router.coupling_loss(layer.experts)
```
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from impls.registry import register_router
from impls.routers.token_choice.topk import TopKConfig, TopKRouter

__all__ = ["ERCConfig", "ERCRouter", "erc_loss", "proxy_tokens"]


def proxy_tokens(router_weight_ND: torch.Tensor, noise: bool) -> torch.Tensor:
    """``R * delta`` with ``delta ~ U(1 - eps_i, 1 + eps_i)`` per entry, ``eps_i`` the bound (float32)."""
    R = router_weight_ND.float()
    n = R.shape[0]
    if not noise or n < 2:
        return R
    with torch.no_grad():
        dist = torch.cdist(R, R) + torch.diag(torch.full((n,), float("inf"), device=R.device))
        eps_N1 = (dist.min(-1).values / (2 * R.norm(dim=-1).clamp_min(1e-12)))[:, None]
        delta = 1 + (torch.rand_like(R) * 2 - 1) * eps_N1
    return R * delta  # the gradient reaches R through the (constant) factor


def erc_loss(
    router_weight_ND: torch.Tensor, gate_proj_NDF: torch.Tensor, alpha: float, noise: bool
) -> torch.Tensor:
    """The ERC loss of router rows ``[n, D]`` and expert gate projections ``[n, D, F]``."""
    n = router_weight_ND.shape[0]
    if n < 2:
        return router_weight_ND.sum() * 0.0
    R = proxy_tokens(router_weight_ND, noise)
    M = torch.einsum("id,jdf->ijf", R, gate_proj_NDF.float()).norm(dim=-1)  # M[i, j] = ||R_i W_g^j||
    diag = M.diagonal()
    off = ~torch.eye(n, dtype=torch.bool, device=R.device)
    row = torch.relu(M - alpha * diag[:, None])  # other experts j on proxy i
    col = torch.relu(M.T - alpha * diag[:, None])  # expert i on other proxies j
    return ((row + col) * off).sum() / n**2


@dataclass(frozen=True, kw_only=True)
class ERCConfig(TopKConfig):
    """Options of ``ERCRouter``: the top-k router's, plus ``alpha`` of the coupling loss."""

    erc_alpha: float = 1.0

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if not self.erc_alpha > 0:
            raise ValueError(f"erc_alpha must be > 0, got {self.erc_alpha}")


@register_router
class ERCRouter(TopKRouter):
    """Softmax top-k routing with the expert-router coupling loss ``coupling_loss(experts)``.

    Lv, Ma, Ma, Qiao, "Coupling Experts and Routers in Mixture-of-Experts via an Auxiliary Loss",
    ICLR 2026, arXiv 2512.23447.
    """

    name = "erc"
    papers = ("erc-loss",)
    Config = ERCConfig
    config: ERCConfig

    def coupling_loss(self, experts) -> torch.Tensor:
        """The ERC loss against an ``impls`` ``GroupedExperts`` (its gate projections)."""
        w = experts.w_in_EDF
        if w.shape[0] != self.num_experts or w.shape[1] != self.d_model:
            raise ValueError(
                f"ERCRouter: experts hold {w.shape[0]} experts of width {w.shape[1]}, the router routes "
                f"{self.num_experts} of width {self.d_model}"
            )
        gate = w[..., : experts.d_hidden] if experts.activation == "swiglu" else w
        return erc_loss(self.gate.weight, gate, self.config.erc_alpha, noise=self.training)
