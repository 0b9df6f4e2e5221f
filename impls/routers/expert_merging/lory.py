r"""Lory: causal segment routing with merged experts, for autoregressive language models.

Zhong, Xia, Chen & Lewis, "Lory: Fully Differentiable Mixture-of-Experts for Autoregressive
Language Model Pre-training", COLM 2024, arXiv 2405.03133 (Sec. 2.2 eq. 2, Sec. 3.1 eq. 3,
App. A pseudo-code, App. G.2).

SMEAR's merged expert (`smear`) sees the whole sequence, which a decoder cannot. Lory cuts each
sequence into segments $S_1, S_2, \dots$ of $T$ tokens (256 in the paper, windows of 4096) and
routes segment $k$ with the average of the **previous** segment:

$$
\bar h_{k-1} = \frac{1}{T} \sum_{x \in S_{k-1}} h_x, \qquad
e^{(k)} = \operatorname{softmax}\big(R(\bar h_{k-1})\big), \qquad
y_x = \operatorname{FFN}\Big(h_x;\ \textstyle\sum_{i=1}^{E} e^{(k)}_i \theta_i\Big) \quad (x \in S_k),
$$

(eq. 3) so no token's expert depends on its own segment or a later one. The first segment has no
predecessor and routes with its **own** average, the router output behind a stop-gradient
(Sec. 3.1). In the pseudo-code the weights are computed for every segment, shifted by one segment,
and the first segment's own weights put back, detached; this router does the same. The paper uses
no balancing loss and no noise (Sec. 5.4, App. G.1), and merges all three SwiGLU matrices.

**Inference.** `eval_routing="segment"` (the default) routes evaluation exactly as training;
`eval_routing="prompt"` is the paper's prompt-only routing for generation (Sec. 3.1, App. G.2):
one decision from the average of the whole prompt, reused for every token of it (and, by the caller,
for the tokens generated after it), so decoding costs one dense FFN.

Causality: a token's routing depends only on earlier segments, except in the first segment, where
it depends on that segment's own tokens (as in the paper, where the stop-gradient keeps the
gradient, not the forward pass, from leaking). `first_segment="uniform"` gives the first segment
equal weights instead, which makes the router strictly causal (`is_causal` is then True).

Deviations: the router $R$ is a linear layer without bias (the paper says "a linear layer");
a last segment shorter than $T$ is routed like the others (the paper's windows are whole
segments); the average runs over valid tokens; similarity-based batching of the training data
(Sec. 3.2) is a data-pipeline method and is out of scope, as is the dense warm-up that copies a
trained dense FFN into every expert (do that with `layer.experts` before training).

## Usage

```python
import torch, impls

layer = impls.MoELayer(d_model=16, d_hidden=32, num_experts=4, router="lory", segment_length=8)
x = torch.randn(2, 32, 16)                                   # 4 segments of 8 tokens
y, plan = layer(x)
print(plan.weights_BGE.shape)                                # torch.Size([2, 4, 4])
x2 = x.clone(); x2[:, 24:] = 0                               # change the last segment only
assert torch.equal(layer(x2)[0][:, :24], y[:, :24])          # earlier segments are unchanged
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from impls.plan import MergePlan
from impls.registry import Preset, register_preset, register_router
from impls.router import SequenceRouter, SequenceRouterConfig

__all__ = ["LORY_03B", "LoryConfig", "LoryRouter"]


@dataclass(frozen=True, kw_only=True)
class LoryConfig(SequenceRouterConfig):
    """Options of ``LoryRouter``.

    Attributes:
        segment_length: tokens per segment ``T``.
        eval_routing: ``"segment"`` (as in training) or ``"prompt"`` (one decision per sequence).
        first_segment: ``"own"`` (the paper: its own average, detached) or ``"uniform"``.
    """

    segment_length: int = 256
    eval_routing: Literal["segment", "prompt"] = "segment"
    first_segment: Literal["own", "uniform"] = "own"

    def validate(self, num_experts: int) -> None:
        super().validate(num_experts)
        if self.k != 1:
            raise ValueError("Lory merges all experts; k does not apply (leave k=1)")
        if not isinstance(self.segment_length, int) or self.segment_length < 1:
            raise ValueError(f"segment_length must be an int >= 1, got {self.segment_length!r}")
        if self.eval_routing not in ("segment", "prompt"):
            raise ValueError(f"eval_routing must be 'segment' or 'prompt', got {self.eval_routing!r}")
        if self.first_segment not in ("own", "uniform"):
            raise ValueError(f"first_segment must be 'own' or 'uniform', got {self.first_segment!r}")


@register_router
class LoryRouter(SequenceRouter):
    """Lory (Zhong et al., COLM 2024, eq. 3): segment k merges experts with segment k-1's average."""

    name = "lory"
    papers = ("lory",)
    causal = False
    plan_type = "merge"
    Config = LoryConfig
    config: LoryConfig

    @property
    def is_causal(self) -> bool:
        prompt = not self.training and self.config.eval_routing == "prompt"
        return self.config.first_segment == "uniform" and not prompt

    @property
    def max_experts_per_token(self) -> int:
        return self.num_experts

    @property
    def combine_normalization(self) -> float:
        return 1.0

    def route_sequences(self, x_BLD: torch.Tensor, token_mask_BL: torch.Tensor) -> MergePlan:
        cfg = self.config
        B, L, D = x_BLD.shape
        prompt = not self.training and cfg.eval_routing == "prompt"
        n = max(L, 1) if prompt else cfg.segment_length
        G = -(-L // n)
        pad = G * n - L
        xg = nn.functional.pad(x_BLD, (0, 0, 0, pad)).view(B, G, n, D)
        mg = nn.functional.pad(token_mask_BL, (0, pad)).view(B, G, n).to(x_BLD.dtype)
        mean_BGD = (xg * mg[..., None]).sum(2) / mg.sum(2, keepdim=True).clamp_min(1)
        logits_BGE = self.compute_logits(mean_BGD)
        probs_BGE = logits_BGE.softmax(-1)
        if prompt:  # one decision from the whole prompt
            weights = probs_BGE
        else:
            first = probs_BGE[:, :1]
            first = (
                first.detach() if cfg.first_segment == "own" else torch.full_like(first, 1 / self.num_experts)
            )
            weights = torch.cat([first, probs_BGE[:, :-1]], dim=1)
        return MergePlan(
            weights_BGE=weights,
            scores_BGE=probs_BGE,
            logits_BGE=logits_BGE,
            group_length=n,
            seq_len=L,
            token_mask_BL=token_mask_BL,
        )


LORY_03B = register_preset(
    Preset(
        name="lory_03b",
        router="lory",
        options={"segment_length": 256},
        num_experts=8,
        papers=("lory",),
        description=(
            "Lory 0.3B/8E (Zhong et al., COLM 2024, Sec. 4.1): every FFN a merged mixture of 8 SwiGLU "
            "experts, segments of 256 tokens in 4096-token windows, no balancing loss."
        ),
        layer={"activation": "swiglu"},
        deviations="Linear router without bias; short last segments are routed like the others.",
    )
)
