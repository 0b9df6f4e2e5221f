"""impls.hf against transformers' own MoE blocks: outputs, routing, gradients, round trips, swaps.

Every block is a tiny randomly initialised transformers module (no download). Equal means 1e-5
in float32, the same decision (which experts each token reaches) and the same weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'moe-atlas[hf]')"
)

import impls  # noqa: E402
import impls.hf as hf  # noqa: E402
from tests.hf_blocks import BLOCKS, PACKED, block_output, config, make_block  # noqa: E402

FAMILIES = list(BLOCKS)
CASES = [(f, impl) for f in FAMILIES for impl in (("eager", "grouped_mm") if f in PACKED else ("eager",))]
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _x(seed=1, shape=(2, 6, 16)):
    torch.manual_seed(seed)
    return torch.randn(*shape)


def hf_routing(block, x) -> torch.Tensor:
    """``[T, E]`` combine weight of every (token, expert) the block computes (0 where none)."""
    family = hf.SUPPORTED_BLOCKS[type(block).__name__]
    seen = {}
    if family == "jetmoe":

        def grab(mod, args, out):
            seen["router"] = out

        h = block.router.register_forward_hook(grab)
    else:

        def grab(mod, args, kwargs):
            seen["args"] = args

        h = block.experts.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            block(x.clone())
    finally:
        h.remove()
    T, E = x.shape[0] * x.shape[1], hf._spec_of(block).num_experts(block)
    W = torch.zeros(T, E)
    if family == "jetmoe":
        _, batch_index, gates, sizes, _ = seen["router"]
        expert = torch.repeat_interleave(torch.arange(E), torch.tensor(sizes))
        W[batch_index, expert] = gates.float()
    elif family == "switch_transformers":
        _, onehot, w = seen["args"]
        onehot = onehot.reshape(T, -1, E)
        W = (onehot.float() * w.reshape(T, -1, 1).float()).sum(1)
    else:
        _, ids, w = seen["args"]
        W.scatter_add_(1, ids.reshape(T, -1), w.reshape(T, -1).float())
    return W


def plan_routing(plan, E) -> torch.Tensor:
    keep = plan.keep_TK & plan.selected_TK
    W = torch.zeros(plan.num_tokens, E)
    W.scatter_add_(1, plan.expert_ids_TK.clamp_min(0), torch.where(keep, plan.weights_TK, 0.0).float())
    return W


@pytest.mark.parametrize(("family", "impl"), CASES)
def test_from_hf_equals_the_block(family, impl):
    block = make_block(family, impl)
    layer = hf.from_hf(block)
    x = _x()
    out, plan = layer(x)
    torch.testing.assert_close(out, block_output(block, x), **TOL)
    E = layer.num_experts
    ref = hf_routing(block, x)
    mine = plan_routing(plan, E)
    assert torch.equal(mine != 0, ref != 0), "a token reaches other experts"
    torch.testing.assert_close(mine, ref, **TOL)


@pytest.mark.parametrize(("family", "impl"), CASES)
def test_gradients_equal_the_block(family, impl):
    """Training mode, no jitter or dropout (the tiny configs have none): every gradient, mapped
    back through to_hf, equals the block's, and so does the input gradient."""
    block = make_block(family, impl).train()
    layer = hf.from_hf(block)
    assert layer.training
    x = _x(2)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    xb, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    (block_output(block, xb) * g).sum().backward()
    out, _ = layer(xl)
    (out * g).sum().backward()
    torch.testing.assert_close(xl.grad, xb.grad, **TOL)
    # the layer's gradients, laid out as the block's weights
    grads = copy.deepcopy(layer)
    with torch.no_grad():
        for p, q in zip(grads.parameters(), layer.parameters(), strict=True):
            p.copy_(q.grad if q.grad is not None else torch.zeros_like(q))
    mapped = hf.to_hf(grads, copy.deepcopy(block))
    got = dict(mapped.named_parameters())
    for name, p in block.named_parameters():
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got[name], want, **TOL, msg=f"gradient of {name}")


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_from_hf_to_hf(family):
    src, dst = make_block(family, seed=0), make_block(family, seed=7)
    x = _x(4)
    assert not torch.allclose(block_output(src, x), block_output(dst, x))
    hf.to_hf(hf.from_hf(src), dst)
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=f"{n} changed in the round trip")
    torch.testing.assert_close(block_output(dst, x), block_output(src, x), atol=0, rtol=0)


def test_layer_settings_follow_the_block():
    """Spot checks that the options came from the block, not the preset defaults."""
    v3 = hf.from_hf(make_block("deepseek_v3"))
    c = v3.router.config
    assert (c.score_func, c.k, c.n_group, c.topk_group, c.routed_scaling_factor) == ("sigmoid", 3, 4, 2, 2.5)
    assert c.normalize and c.aux_free_bias and v3.num_shared_experts == 1
    torch.testing.assert_close(v3.router.expert_bias, make_block("deepseek_v3").gate.e_score_correction_bias)
    q2 = hf.from_hf(make_block("qwen2_moe"))
    assert q2.shared is not None and q2.shared.gate is not None and not q2.router.config.normalize
    sw = hf.from_hf(make_block("switch_transformers"))
    assert sw.activation == "relu" and sw.router.config.expert_capacity == 3
    assert sw.router.config.capacity_groups == "sequence" and sw.router.gate.bias is not None
    oss = hf.from_hf(make_block("gpt_oss"))
    assert oss.activation == "gpt_oss_swiglu" and oss.experts.has_bias
    jet = hf.from_hf(make_block("jetmoe"))
    assert jet.output_bias is not None and jet.router.config.softmax_order == "after"


def test_switch_capacity_is_per_sequence_and_drops_like_transformers():
    """One expert takes every token: each sequence keeps exactly its first expert_capacity tokens."""
    block = make_block("switch_transformers")
    with torch.no_grad():
        block.router.classifier.weight.zero_()
        block.router.classifier.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    layer = hf.from_hf(block)
    x = _x(5, (3, 7, 16))
    out, plan = layer(x)
    keep = plan.keep_TK.view(3, 7)
    assert keep.sum(1).tolist() == [3, 3, 3] and keep[:, :3].all()
    torch.testing.assert_close(out, block_output(block, x), **TOL)
    assert torch.equal(out[:, 3:], torch.zeros_like(out[:, 3:]))  # dropped: residual only


def test_to_hf_refuses_a_block_of_another_shape():
    layer = hf.from_hf(make_block("mixtral"))
    other = make_block("qwen2_moe")
    with pytest.raises(ValueError, match="to_hf"):
        hf.to_hf(layer, other)


def test_unsupported_module_is_named():
    with pytest.raises(hf.UnsupportedBlockError, match="Linear is not a supported"):
        hf.from_hf(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- swap_routers


class _Holder(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.mlp = block

    def forward(self, x):
        return block_output(self.mlp, x)


@pytest.mark.parametrize("mode", ["gate", "layer"])
@pytest.mark.parametrize("family", FAMILIES)
def test_swapping_in_the_blocks_own_routing_changes_nothing(family, mode):
    """A swap to the impls router equal to the block's own keeps the output; restore() undoes it."""
    block = make_block(family, "grouped_mm" if family in PACKED else "eager")
    model = _Holder(block)
    x = _x(6)
    before = model(x)
    swapped = hf.swap_routers(model, lambda b: hf.from_hf(b).router, mode=mode)
    assert swapped.mode == mode and list(swapped.modules) == ["mlp"]
    torch.testing.assert_close(model(x), before, **TOL)
    assert swapped.plans()["mlp"] is not None
    swapped.restore()
    assert model.mlp is block and type(hf._spec_of(block)) is hf._Spec
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)


def test_capacity_drops_and_padding_reach_transformers_experts_as_zero_weights():
    block = make_block("mixtral", "grouped_mm")
    model = _Holder(block)
    swapped = hf.swap_routers(model, "topk", capacity_factor=0.5)
    x = _x(7)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    with swapped.token_mask(mask):
        out = model(x)
    plan = swapped.plans()["mlp"]
    assert plan.fraction_dropped > 0
    assert torch.equal(plan.token_mask_T, mask.reshape(-1))
    assert torch.equal(out[1, 4:], torch.zeros_like(out[1, 4:]))
    dropped_everywhere = ~(plan.keep_TK.any(1))
    assert torch.equal(
        out.reshape(12, -1)[dropped_everywhere], torch.zeros_like(out.reshape(12, -1)[dropped_everywhere])
    )


def _tiny_mixtral(seed=0):
    cfg = transformers.MixtralConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        output_router_logits=True,
    )
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(cfg)


@pytest.mark.parametrize(("router", "options"), [("sinkhorn_ot", {}), ("aux_loss_free", {"k": 2})])
def test_fine_tuning_a_tiny_mixtral_with_a_swapped_router(router, options):
    model = _tiny_mixtral()
    swapped = hf.swap_routers(model, router, **options)
    assert len(swapped.modules) == 2 and swapped.mode == "gate"
    assert model.config.output_router_logits is False  # the model's own aux loss is replaced
    routed = {}

    def spy(name):
        def hook(mod, args):
            routed[name] = args[1].clone()

        return hook

    hooks = [model.get_submodule(n).experts.register_forward_pre_hook(spy(n)) for n in swapped.modules]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 48, (4, 12), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        out = model(input_ids=ids, labels=ids)
        (out.loss + swapped.aux_loss()).backward()
        opt.step()
        opt.zero_grad()
        swapped.step()
        losses.append(out.loss.item())
        for n, plan in swapped.plans().items():  # the experts ran exactly the plan's choices
            keep = plan.keep_TK & plan.selected_TK
            assert torch.equal(routed[n], torch.where(keep, plan.expert_ids_TK, 0))
    for h in hooks:
        h.remove()
    assert losses[-1] < losses[0] - 0.3, losses
    r = next(iter(swapped.routers.values()))
    assert r.name == ("sinkhorn_ot" if router == "sinkhorn_ot" else "deepseek")
    if router == "aux_loss_free":
        assert r.expert_bias.abs().sum() > 0  # the bias moved with the loads, once per step


def test_aux_loss_sums_the_weighted_plan_losses_of_every_block():
    model = _tiny_mixtral()
    swapped = hf.swap_routers(model, "mixtral_8x7b")
    assert swapped.loss_coefficients == {"load_balance": 0.02}
    assert float(swapped.aux_loss()) == 0.0  # nothing routed yet
    model(input_ids=torch.randint(0, 48, (2, 8)))
    want = sum(0.02 * p.losses["load_balance"] for p in swapped.plans().values())
    torch.testing.assert_close(swapped.aux_loss(), want)


def test_soft_moe_needs_layer_mode_and_auto_picks_it():
    model = _tiny_mixtral()
    with pytest.raises(ValueError, match="mode='layer'"):
        hf.swap_routers(model, "soft_moe", mode="gate")
    swapped = hf.swap_routers(model, "soft_moe")
    assert swapped.mode == "layer"
    assert all(isinstance(m, hf.HFMoEBlock) for m in swapped.modules.values())
    out = model(input_ids=torch.randint(0, 48, (2, 8)), labels=torch.randint(0, 48, (2, 8)))
    out.loss.backward()
    assert isinstance(swapped.plans()["model.layers.0.mlp"], impls.SlotPlan)


def test_swap_errors_name_the_problem():
    with pytest.raises(KeyError, match="unknown router"):
        hf.swap_routers(_tiny_mixtral(), "no_such_router")
    with pytest.raises(hf.UnsupportedBlockError, match="no supported MoE block"):
        hf.swap_routers(torch.nn.Sequential(torch.nn.Linear(2, 2)), "topk")
    with pytest.raises(ValueError, match="routing inputs"):
        hf.swap_routers(_tiny_mixtral(), "hash", vocab_size=48)


def test_qwen3_block_keeps_per_batch_balance_and_others_follow_config():
    layer = hf.from_hf(make_block("qwen3_moe"))
    assert layer.router.config.global_balance is False
    assert config("qwen3_moe").norm_topk_prob is True
