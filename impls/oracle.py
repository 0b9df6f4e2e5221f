"""The naive MoE layer: a Python loop over experts, kept **only as the test oracle**.

It is deliberately plain, the loop of Hugging Face's ``MixtralSparseMoeBlock``: for every expert
``e`` it finds (with ``nonzero``, a host sync) the token slots routed to ``e`` that survived
capacity, runs expert ``e`` on those tokens, and adds ``w_tj * E_e(x_t)`` to their output with
``index_add``. Obviously correct and slow (a Python loop over experts, a gather and a scatter
per expert); ``impls.MoELayer``'s sorted, grouped path must match it, outputs and
gradients. Never use it for training.
"""

from __future__ import annotations

import torch

from impls.layer import MoELayer
from impls.plan import RoutingPlan


def moe_loop_reference(
    layer: MoELayer,
    x: torch.Tensor,
    padding_mask: torch.Tensor | None = None,
    plan: RoutingPlan | None = None,
) -> tuple[torch.Tensor, RoutingPlan]:
    """What ``layer(x, padding_mask)`` must return, computed expert by expert (slow).

    ``plan`` reuses a routing decision (e.g. one taken under noise); by default the layer's
    router is called, so gradients reach the router exactly as in the fast path.
    """
    if plan is None:
        plan = layer.route(x, padding_mask)
    x_TD = x.reshape(-1, layer.d_model)
    xc = x_TD.to(layer.experts.w_in_EDF.dtype)
    keep_TK = plan.keep_TK & plan.selected_TK
    acc = torch.promote_types(xc.dtype, torch.float32)
    out_TD = torch.zeros(x_TD.shape, dtype=acc, device=x.device)
    for e in range(layer.num_experts):
        tokens, slots = ((plan.expert_ids_TK == e) & keep_TK).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        y = layer.experts.expert_forward(e, xc[tokens]).to(acc)
        out_TD = out_TD.index_add(0, tokens, y * plan.weights_TK[tokens, slots, None].to(acc))
    out_TD = out_TD.to(x.dtype)
    if layer.shared is not None:
        shared = layer.shared(xc).to(x.dtype)
        if padding_mask is not None:
            shared = shared * padding_mask.reshape(-1, 1).to(shared.dtype)
        out_TD = out_TD + shared
    if layer.output_bias is not None:
        bias_TD = layer.output_bias.to(x.dtype).expand_as(out_TD)
        if padding_mask is not None:
            bias_TD = bias_TD * padding_mask.reshape(-1, 1).to(x.dtype)
        out_TD = out_TD + bias_TD
    return out_TD.view(x.shape), plan
