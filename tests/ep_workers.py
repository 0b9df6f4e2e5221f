"""Functions the expert-parallel tests run on every rank (importable by spawned processes)."""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
import torch.distributed as dist

from impls import MoELayer
from impls.parallel import ExpertParallel

D, F = 16, 32


def _err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double() - b.detach().double()).abs().max())


def _mask(spec, total: int, sizes: list[int]) -> torch.Tensor | None:
    how = spec.get("mask")
    if how is None:
        return None
    g = torch.Generator().manual_seed(7)
    m = torch.rand(total, generator=g) > 0.25
    if how == "rank1_all_masked":
        off = sizes[0]
        m[off : off + sizes[1]] = False
    return m


def equality(rank: int, world: int, spec: dict) -> dict:
    """One EP layer against one single-process layer on all ranks' tokens; max errors by name."""
    torch.manual_seed(spec.get("seed", 0))
    E = spec.get("num_experts", 8)
    device = torch.device(f"cuda:{rank}") if spec.get("device") == "cuda" else torch.device("cpu")
    layer = MoELayer(D, F, E, spec["router"], **spec.get("options", {})).to(device)
    layer.train(spec.get("train", True))
    if spec.get("hot_expert") is not None:  # skew the routing towards one expert
        with torch.no_grad():  # needs router_bias=True
            layer.router.gate.bias[spec["hot_expert"]] += spec.get("hot_strength", 1.0)
    ref = copy.deepcopy(layer)
    gr = spec.get("grad_reduction", "mean")
    if spec.get("policy") == "relibra" and spec.get("plan_placement"):
        spec = {**spec, "policy": _planned_relibra(spec, E, world), "policy_options": {}}
    ep = ExpertParallel(
        layer,
        routing=spec.get("routing", "global"),
        policy=spec.get("policy"),
        grad_reduction=gr,
        **spec.get("policy_options", {}),
    )
    coefs = spec.get("coefficients", ep.loss_coefficients)
    sizes, seq = spec["sizes"], spec.get("seq")
    off, n, total = sum(sizes[:rank]), sizes[rank], sum(sizes)
    scale = world if gr == "mean" else 1
    lr = spec.get("lr", 0.0)
    opt_ep = torch.optim.SGD(ep.parameters(), lr=lr) if lr else None
    opt_ref = torch.optim.SGD(ref.parameters(), lr=lr) if lr else None
    errs: dict[str, float] = defaultdict(float)
    mask_all = _mask(spec, total, sizes)
    mask_all = None if mask_all is None else mask_all.to(device)
    ref_params = dict(ref.named_parameters())
    sl = slice(ep.first_expert, ep.first_expert + ep.experts_per_rank)
    for step in range(spec.get("steps", 1)):
        g = torch.Generator().manual_seed(100 + step)
        X = torch.randn(total, D, generator=g).to(device)
        G = torch.randn(total, D, generator=g).to(device)
        mask_r = None if mask_all is None else mask_all[off : off + n]

        def shaped(t, m):
            if seq is None:
                return t, m
            return t.view(-1, seq, D), (None if m is None else m.view(-1, seq))

        xr = X[off : off + n].clone().requires_grad_()
        xin, min_ = shaped(xr, mask_r)
        out, plan = ep(xin, min_)
        loss = (out.reshape(-1, D) * G[off : off + n]).sum()
        if coefs:
            loss = loss + plan.aux_loss(coefs)
        loss.backward()
        ep.all_reduce_grads()
        Xr = X.clone().requires_grad_()
        xin, min_ = shaped(Xr, mask_all)
        out_ref, plan_ref = ref(xin, min_)
        task = (out_ref.reshape(-1, D) * G).sum()
        J = task / world if gr == "mean" else task
        if coefs:
            J = J + plan_ref.aux_loss(coefs)
        J.backward()
        errs["output"] = max(errs["output"], _err(out.reshape(-1, D), out_ref.reshape(-1, D)[off : off + n]))
        errs["input_grad"] = max(errs["input_grad"], _err(xr.grad, scale * Xr.grad[off : off + n]))
        ids_ref = plan_ref.expert_ids_TK[off : off + n]
        keep_ref = plan_ref.keep_TK[off : off + n]
        errs["routing"] = max(
            errs["routing"],
            float(not torch.equal(plan.expert_ids_TK, ids_ref) or not torch.equal(plan.keep_TK, keep_ref)),
        )
        errs["weights"] = max(errs["weights"], _err(plan.weights_TK, plan_ref.weights_TK[off : off + n]))
        for name, p in ep.named_parameters():
            rp = ref_params[name]
            want = rp.grad[sl] if name.startswith("experts.") else rp.grad
            errs[f"grad:{name}"] = max(errs[f"grad:{name}"], _err(p.grad, want))
        for name, v in plan.losses.items() if spec.get("routing", "global") == "global" else ():
            want = plan_ref.losses[name] / (world if gr == "sum" else 1)
            errs[f"loss:{name}"] = max(errs[f"loss:{name}"], _err(v.detach(), want.detach()))
        if opt_ep is not None:
            opt_ep.step()
            opt_ref.step()
        ep.step()
        ref.router.on_optimizer_step()
        ep.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    for name, p in ep.named_parameters():
        rp = ref_params[name]
        want = rp[sl] if name.startswith("experts.") else rp
        errs[f"param:{name}"] = _err(p.detach(), want.detach())
    ref_bufs = dict(ref.named_buffers())
    state = {k: v.detach().cpu().clone() for k, v in ep.router.named_buffers()}
    for k, v in state.items() if spec.get("routing", "global") == "global" else ():
        errs[f"buffer:{k}"] = _err(v.float(), ref_bufs[f"router.{k}"].float().cpu())
    a = ep.last_assignment
    return {
        "errors": dict(errs),
        "router_state": state,
        "load": None if a is None else a.load_R.tolist(),
        "transfers": None if a is None else a.transfers,
        "low_precision": None if a is None else a.low_precision_R.tolist(),
    }


def all_equal_across_ranks(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(p, t) for p in parts)


def checkpoint_save(rank: int, world: int, path: str, spec: dict) -> dict:
    """Save a sharded EP layer with ``torch.distributed.checkpoint``; return the full layer's state."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(spec.get("seed", 0))
    layer = MoELayer(D, F, spec.get("num_experts", 8), spec["router"], **spec.get("options", {}))
    with torch.no_grad():  # router state that is not the initial one
        for b in layer.router.buffers():
            if b.is_floating_point():
                b.uniform_(-1, 1)
    full = {k: v.clone() for k, v in layer.state_dict().items()}
    ep = ExpertParallel(layer)
    dcp.save(ep.sharded_state_dict(), checkpoint_id=path)
    return full


def checkpoint_load(rank: int, world: int, path: str, spec: dict) -> dict:
    """Load the checkpoint into a differently initialized EP layer on this world size; max error per key
    against the saved full layer (its slice for the experts)."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(spec.get("seed", 0) + 1)
    layer = MoELayer(D, F, spec.get("num_experts", 8), spec["router"], **spec.get("options", {}))
    ep = ExpertParallel(layer)
    sd = ep.sharded_state_dict()
    dcp.load(sd, checkpoint_id=path)
    ep.load_sharded_state_dict(sd)
    full = spec["full"]
    sl = slice(ep.first_expert, ep.first_expert + ep.experts_per_rank)
    out = {}
    for k, v in ep.state_dict().items():
        want = full[k][sl] if k.startswith("experts.") else full[k]
        out[k] = _err(v.float(), want.float()) if v.shape == want.shape else float("inf")
    return out


class _TinyModel(torch.nn.Module):
    """Input projection, an MoE block with its residual, a scalar head."""

    def __init__(self, moe: torch.nn.Module):
        super().__init__()
        self.inp = torch.nn.Linear(D, D)
        self.moe = moe
        self.head = torch.nn.Linear(D, 1)

    def forward(self, x):
        h = self.inp(x)
        m, plan = self.moe(h)
        return self.head(h + m).squeeze(-1), plan


def ddp_training(rank: int, world: int, spec: dict) -> dict:
    """Train an EP model under DistributedDataParallel and the same model on one process on the
    concatenated batches (mean objective); max parameter difference after the steps."""
    from impls.parallel import data_parallel

    torch.manual_seed(0)
    layer = MoELayer(D, F, spec.get("num_experts", 8), spec["router"], **spec.get("options", {}))
    ref = _TinyModel(copy.deepcopy(layer))
    torch.manual_seed(1)
    ref.inp.reset_parameters()
    ref.head.reset_parameters()
    model = _TinyModel(ExpertParallel(layer))
    model.inp.load_state_dict(ref.inp.state_dict())
    model.head.load_state_dict(ref.head.state_dict())
    ddp = data_parallel(model)
    coefs = spec.get("coefficients", {})
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    n = spec.get("tokens", 16)
    losses = []
    for step in range(spec.get("steps", 3)):
        g = torch.Generator().manual_seed(10 + step)
        X, Y = torch.randn(world * n, D, generator=g), torch.randn(world * n, generator=g)
        pred, plan = ddp(X[rank * n : (rank + 1) * n])
        loss = torch.nn.functional.mse_loss(pred, Y[rank * n : (rank + 1) * n])
        if coefs:
            loss = loss + plan.aux_loss(coefs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.moe.step()
        pred_ref, plan_ref = ref(X)
        J = torch.nn.functional.mse_loss(pred_ref, Y)
        if coefs:
            J = J + plan_ref.aux_loss(coefs)
        opt_ref.zero_grad()
        J.backward()
        opt_ref.step()
        ref.moe.router.on_optimizer_step()
        losses.append(J.item())
    ep = model.moe
    sl = slice(ep.first_expert, ep.first_expert + ep.experts_per_rank)
    ref_p = dict(ref.named_parameters())
    errs = {}
    for name, p in model.named_parameters():
        want = ref_p[name][sl] if name.startswith("moe.experts.") else ref_p[name]
        errs[name] = _err(p, want)
    return {"errors": errs, "losses": losses}


def _planned_relibra(spec: dict, E: int, world: int):
    from impls.parallel import ReLibra

    pol = ReLibra(**spec.get("policy_options", {}))
    pol.plan_placement(torch.tensor(spec["plan_placement"]), world)
    return pol


def equality_many(rank: int, world: int, specs: dict) -> dict:
    """``equality`` for every named spec, in one process group."""
    out = {}
    for name, spec in specs.items():
        out[name] = equality(rank, world, spec)
    return out


def refusals(rank: int, world: int) -> dict:
    """The messages of the errors ExpertParallel raises for bad set-ups, on every rank."""
    msgs = {}
    for name, build in {
        "indivisible": lambda: ExpertParallel(MoELayer(D, F, 3, "topk")),
        "soft_moe": lambda: ExpertParallel(MoELayer(D, F, 4, "soft_moe")),
        "routing": lambda: ExpertParallel(MoELayer(D, F, 4, "topk"), routing="central"),
    }.items():
        try:
            build()
        except (ValueError, TypeError) as exc:
            msgs[name] = str(exc)
    ep = ExpertParallel(MoELayer(D, F, 4, "topk"))
    try:
        ep(torch.randn(2, 3 + rank, D))  # different sequence lengths on the ranks
    except ValueError as exc:
        msgs["seq"] = str(exc)
    try:
        ep(torch.randn(4, D), token_modality=torch.ones(3, dtype=torch.bool))
    except ValueError as exc:
        msgs["modality"] = str(exc)
    return msgs


def built_sharded(rank: int, world: int, spec: dict) -> dict:
    """``ExpertParallel.build`` against ``full_layer``: same weights (this rank's slice), same output."""
    from impls.parallel import full_layer

    args = (D, F, spec.get("num_experts", 8), spec["router"])
    ep = ExpertParallel.build(*args, seed=spec.get("seed", 0), **spec.get("options", {}))
    ref = full_layer(*args, seed=spec.get("seed", 0), **spec.get("options", {}))
    ep.eval()
    ref.eval()
    sl = slice(ep.first_expert, ep.first_expert + ep.experts_per_rank)
    want = ref.state_dict()
    errs = {
        k: _err(v, want[k][sl] if k.startswith("experts.") else want[k]) for k, v in ep.state_dict().items()
    }
    n = 6
    X = torch.randn(world * n, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, _ = ep(X[rank * n : (rank + 1) * n])
        out_ref, _ = ref(X)
    errs["output"] = _err(out, out_ref[rank * n : (rank + 1) * n])
    return errs
