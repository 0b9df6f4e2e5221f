"""One arena run: train the byte-level LM with one router (or a dense baseline) and measure it.

Every run sees the same data in the same order (batches drawn from a generator seeded by the run's
seed: a domain uniformly, then a window uniformly inside it), the same model, optimizer and
schedule; only the FFN differs. What a router's paper fixes (its preset's options, layer settings
and loss weights) is kept; everything else is shared, including the auxiliary-loss weights of
bare routers (``DEFAULT_COEFFICIENTS``).

A run returns a JSON-ready dict: the curve (validation loss and bits per byte per domain at each
checkpoint), speed (training tokens per second, share of the forward time spent in routers),
routing metrics on validation text at each checkpoint (``scripts.arena.metrics``), the applicability
note, and the provenance.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import impls
from impls.routers.non_trainable.random_routing import thor_consistency_loss
from scripts.arena import metrics
from scripts.arena.corpus import DOMAINS, Corpus
from scripts.arena.model import DenseFFN, ModelConfig, TinyLM, expert_weights, moe_layers

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]

#: loss weights for routers whose preset fixes none (only the names a plan produces are used)
DEFAULT_COEFFICIENTS = {
    "load_balance": 1e-2,
    "z_loss": 1e-3,
    "importance": 1e-2,
    "load": 1e-2,
    "entropy": 1e-3,
    "reachability": 1e-3,
    "l1_adaptive": 1.0,  # ReMoE: its coefficient lambda adapts itself; the paper adds the term with 1
    "balance": 0.3,  # StableMoE's balance and distillation factors
    "distill": 0.3,
    "diverse": 1e-2,  # DynMoE's gate losses, each 0.01 in the official code
    "simple": 1e-2,
    "efficiency": 1e-2,
    "mutual_information": 1e-2,  # ModuleFormer's and Mod-Squad's MI losses (released weights: 0 / 0.005)
    "expert_token_balance_adaptive": 1.0,  # Routing-Free MoE: lambda adapts itself (Eq. 17)
    "phi_balance": 1e-2,  # ϕ-Balancing: no published weight; the Switch loss's
    "orthogonality": 0.1,  # SimBal's (unconfirmed) weight
    "variance": 1e-3,  # Guo et al.'s routing variance (returned negated: maximized)
    "mask_sparsity": 1e-2,  # BEAM's mask regularizer (no published weight)
    "lpr": 1e-2,  # Latent Prototype Routing's regularizers, as released
}
BASELINES = ("dense_active", "dense_total")
#: THOR's consistency weight: 1 in the official code, 5 in its IWSLT De-En script (the preset)
THOR_ALPHA = {"thor": 1.0, "thor_iwslt": 5.0}
#: StableMoE's first stage: 6K of 60K steps (Dai et al. 2022, Sec. 4.2 and Table 6)
STAGE1_FRACTION = 0.1


@dataclass(frozen=True)
class ArenaConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 200
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.01
    clip: float = 1.0
    eval_every: int = 25
    eval_windows: int = 16
    """Validation windows per domain (fixed offsets, evenly spread)."""
    threads: int = 2

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------- entries


def entries() -> list[str]:
    """The baselines, then every registered router and preset, in name order."""
    return [*BASELINES, *sorted(impls.ROUTERS), *sorted(impls.PRESETS)]


def _router_class(name: str) -> type[impls.Router]:
    preset = impls.PRESETS.get(name)
    return impls.ROUTERS[preset.router if preset else name]


def router_options(name: str, cfg: ArenaConfig) -> tuple[dict[str, Any], list[str]]:
    """Options the arena sets for ``name`` (with the reason for each), beyond its preset's."""
    cls = _router_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    fixed = dict(impls.PRESETS[name].options) if name in impls.PRESETS else {}
    opts: dict[str, Any] = {}
    notes: list[str] = []
    if "vocab_size" in fields:
        opts["vocab_size"] = 256
        notes.append("token ids are bytes (vocab_size 256)")
    if "num_domains" in fields:
        opts["num_domains"] = 4
        notes.append(
            "4 domain groups of 2 experts (num_domains must divide the 8 experts; the corpus has 3 domains, "
            "so one group is never used)"
            + (
                f"; the paper's {fixed['num_domains']} domains do not fit 8 experts"
                if "num_domains" in fixed
                else ""
            )
        )
    if "num_tasks" in fields and "num_tasks" not in fixed:
        opts["num_tasks"] = len(DOMAINS)
        notes.append("the task is the document's domain")
    if "segment_length" in fields:
        opts["segment_length"] = cfg.model.seq_len // 4
        notes.append(f"segments of {cfg.model.seq_len // 4} bytes (4 per window; the paper's 256 exceed it)")
    if cls.routing_inputs and any(n != "token_ids" for n in cls.routing_inputs):
        notes.append("its label is the document's domain (en, de, py)")
    return opts, notes


def applicability(name: str) -> tuple[bool, str]:
    """``(runs, note)``: whether a causal LM can use ``name``, and the caveat or the reason not."""
    if name in BASELINES:
        return True, ""
    cls = _router_class(name)
    if cls.plan_type == "slots":
        return False, (
            "not applicable: every slot mixes all the tokens of a sequence, so each position would see "
            "the bytes it must predict (Soft MoE is not causal; Puigcerver et al. Sec. 6)"
        )
    if cls.name in ("smear", "meo", "sentence_moe"):
        return False, (
            "not applicable: routes on the average of the whole sequence, later tokens included, so a "
            "causal LM would read the future through the routing"
        )
    if cls.name in ("moa", "moh"):
        return False, (
            "not applicable here: it routes attention heads (MixtureOfAttentionHeads / "
            "MixtureOfHeadsAttention), while the arena's MoE layers replace the FFNs"
        )
    if cls.name == "flextron":
        return False, (
            "not applicable here: it picks a width of one nested elastic MLP (ElasticMLP) for a latency "
            "budget, while the arena's MoE layers hold separate experts"
        )
    if cls.name == "mov":
        return False, (
            "not applicable here: MoV/MoLoRA merge lightweight adapters on a frozen pretrained model; "
            "merging full FFN experts per token would cost tokens x D x F memory per layer"
        )
    return True, ""


# ---------------------------------------------------------------------------------- data


class Batches:
    """Seeded training windows and fixed validation windows from a ``Corpus``."""

    def __init__(self, corpus: Corpus, seq_len: int, seed: int):
        self.seq_len = seq_len
        self.train = {d: torch.frombuffer(bytearray(corpus.train[d]), dtype=torch.uint8) for d in DOMAINS}
        self.val = {d: torch.frombuffer(bytearray(corpus.val[d]), dtype=torch.uint8) for d in DOMAINS}
        for split, data in (("train", self.train), ("val", self.val)):
            for d, t in data.items():
                if t.numel() < seq_len + 2:
                    raise ValueError(
                        f"corpus {split} split of domain {d!r} has {t.numel()} bytes, need > {seq_len + 1}"
                    )
        self.g = torch.Generator().manual_seed(seed)

    def _windows(self, data: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        w = data[idx].long()
        return w[:, :-1], w[:, 1:]

    def next(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(inputs [B, L], targets [B, L], domain [B])``."""
        dom = torch.randint(0, len(DOMAINS), (batch,), generator=self.g)
        xs, ys = [], []
        for i in range(batch):
            data = self.train[DOMAINS[int(dom[i])]]
            start = torch.randint(0, data.numel() - self.seq_len - 1, (1,), generator=self.g)
            x, y = self._windows(data, start)
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys), dom

    def validation(self, windows: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        out = []
        for d in DOMAINS:
            data = self.val[d]
            starts = torch.linspace(0, data.numel() - self.seq_len - 2, windows).long()
            x, y = self._windows(data, starts)
            out.append((d, x, y))
        return out


def routing_inputs(layer_router, ids_BL: torch.Tensor, dom_B: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token ids are the input bytes; every other label is the document's domain (one per sequence)."""
    return {n: ids_BL if n == "token_ids" else dom_B for n in getattr(layer_router, "routing_inputs", ())}


# ---------------------------------------------------------------------------------- model


def build_model(name: str, cfg: ArenaConfig) -> tuple[TinyLM, dict[str, Any]]:
    m = cfg.model
    if name == "dense_active":
        width = m.d_hidden * 2  # the arena's reference router activates k = 2 experts (top-2)
        return TinyLM(m, lambda: DenseFFN(m.d_model, width)), {"ffn_width": width}
    if name == "dense_total":
        width = m.d_hidden * m.num_experts
        return TinyLM(m, lambda: DenseFFN(m.d_model, width)), {"ffn_width": width}
    opts, _ = router_options(name, cfg)

    def ffn():
        layer = impls.MoELayer(m.d_model, m.d_hidden, num_experts=m.num_experts, router=name, **opts)
        layer.from_preset = name in impls.PRESETS
        return layer

    return TinyLM(m, ffn), {"router_options": opts}


def _coefficients(layer: impls.MoELayer, plan) -> dict[str, float]:
    """A preset's own loss weights (none, if its paper uses none); the defaults for bare routers."""
    coefs = layer.loss_coefficients if getattr(layer, "from_preset", False) else DEFAULT_COEFFICIENTS
    return {k: v for k, v in coefs.items() if k in plan.losses}


def _lm_loss(model, x, y, dom) -> tuple[torch.Tensor, torch.Tensor, list, torch.Tensor]:
    """``(cross-entropy, weighted auxiliary losses, plans, logits)`` of one batch."""
    layers = moe_layers(model)
    inputs = routing_inputs(layers[0].router, x, dom) if layers else {}
    logits, plans = model(x, inputs)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    aux = logits.new_zeros(())
    for layer, plan in zip(layers, [p for p in plans if p is not None], strict=True):
        aux = aux + plan.aux_loss(_coefficients(layer, plan))
    return ce, aux, plans, logits


# ---------------------------------------------------------------------------------- run


def provenance(corpus: Corpus) -> dict[str, str]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        # results written by earlier runs are not a change to the code that produced them
        status = ["git", "status", "--porcelain", "--", ".", ":!scripts/arena/results"]
        dirty = bool(subprocess.run(status, cwd=ROOT, capture_output=True, text=True).stdout)
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or platform.machine()
    return {
        "commit": commit + ("+dirty" if dirty else ""),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {cpu}, {torch.get_num_threads()} threads",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "corpus_manifest_sha256": corpus.manifest_sha256,
        "script": "scripts/arena_run.py",
    }


class _RouterTimer:
    """Wall time spent inside the routers' forward (hooks on every MoE layer's router)."""

    def __init__(self, model: TinyLM):
        self.total = 0.0
        self._t0: dict[int, float] = {}
        self.handles = []
        for layer in moe_layers(model):
            self.handles.append(layer.router.register_forward_pre_hook(self._pre))
            self.handles.append(layer.router.register_forward_hook(self._post))

    def _pre(self, module, args):
        self._t0[id(module)] = time.perf_counter()

    def _post(self, module, args, out):
        self.total += time.perf_counter() - self._t0.pop(id(module), time.perf_counter())

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def evaluate(model: TinyLM, val, prev_top: list | None) -> tuple[dict[str, Any], list]:
    model.eval()
    per_domain, doms, drops = {}, [], []
    layer_w: list[list[torch.Tensor]] = []
    layer_s: list[list[torch.Tensor]] = []
    layer_load: list[torch.Tensor] = []
    for di, (d, x, y) in enumerate(val):
        dom = torch.full((x.shape[0],), di, dtype=torch.long)
        ce, _, plans, _ = _lm_loss(model, x, y, dom)
        per_domain[d] = float(ce)
        doms.append(torch.full((x.numel(),), di, dtype=torch.long))
        plans = [p for p in plans if p is not None]
        for li, plan in enumerate(plans):
            w, s = expert_weights(plan)
            # token-choice load counts the tokens an expert computes; soft loads are token-equivalents
            load = plan.expert_load if isinstance(plan, impls.RoutingPlan) else w.sum(0)
            if len(layer_w) <= li:
                layer_w.append([])
                layer_s.append([])
                layer_load.append(torch.zeros_like(load))
            layer_w[li].append(w)
            layer_s[li].append(s)
            layer_load[li] = layer_load[li] + load
            if isinstance(plan, impls.RoutingPlan):
                drops.append(float(plan.fraction_dropped))
    loss = sum(per_domain.values()) / len(per_domain)
    out: dict[str, Any] = {
        "val_loss": loss,
        "val_bpb": metrics.bits_per_byte(loss),
        "val_bpb_by_domain": {d: metrics.bits_per_byte(v) for d, v in per_domain.items()},
    }
    tops = []
    if layer_w:
        domain_N = torch.cat(doms)
        rows = []
        for li, (wl, sl) in enumerate(zip(layer_w, layer_s, strict=True)):
            w, s, load = torch.cat(wl), torch.cat(sl), layer_load[li]
            ent, conf = metrics.entropy_and_confidence(s)
            top = metrics.top_expert(w)
            tops.append(top)
            rows.append(
                {
                    **metrics.load_stats(load),
                    "load": [round(float(v), 3) for v in load],
                    "entropy": ent,
                    "confidence": conf,
                    "experts_per_token": float((w > 0).sum(-1).float().mean()),
                    "domain_mi_bits": metrics.mutual_information(domain_N, w, len(DOMAINS)),
                    "stability_change": metrics.stability(prev_top[li] if prev_top else None, top),
                }
            )
        keys = ("max_over_mean", "cv", "gini", "entropy", "confidence", "experts_per_token", "domain_mi_bits")
        out["routing"] = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
        changes = [r["stability_change"] for r in rows if r["stability_change"] is not None]
        out["routing"]["top_expert_changed"] = sum(changes) / len(changes) if changes else None
        out["routing"]["fraction_dropped"] = sum(drops) / len(drops) if drops else 0.0
        out["routing"]["domain_entropy_bits"] = metrics.entropy_bits(torch.bincount(domain_N).float())
        out["routing_by_layer"] = rows
    model.train()
    return out, tops


@torch.no_grad()
def routing_trace(model: TinyLM, val) -> dict[str, Any]:
    """Every MoE layer's routing of the validation windows (real text), for ``impls.parallel``'s
    simulator: ``{"layers": [{"expert_ids": long [T, K], "keep": bool [T, K]}, ...],
    "num_experts": E, "domains": long [T], "domain_names": [...]}``; token-routing layers only."""
    model.eval()
    layers: list[dict[str, list[torch.Tensor]]] = []
    doms = []
    for di, (_, x, y) in enumerate(val):
        dom = torch.full((x.shape[0],), di, dtype=torch.long)
        _, _, plans, _ = _lm_loss(model, x, y, dom)
        plans = [p for p in plans if isinstance(p, impls.RoutingPlan)]
        for li, plan in enumerate(plans):
            if len(layers) <= li:
                layers.append({"expert_ids": [], "keep": []})
            layers[li]["expert_ids"].append(plan.expert_ids_TK.clone())
            layers[li]["keep"].append((plan.keep_TK & plan.selected_TK).clone())
        doms.append(torch.full((x.numel(),), di, dtype=torch.long))
    model.train()
    moe = moe_layers(model)
    return {
        "layers": [{k: torch.cat(v) for k, v in layer.items()} for layer in layers],
        "num_experts": moe[0].num_experts if moe else 0,
        "d_model": moe[0].d_model if moe else 0,
        "d_hidden": moe[0].d_hidden if moe else 0,
        "activation": moe[0].activation if moe else "",
        "domains": torch.cat(doms) if doms else torch.zeros(0, dtype=torch.long),
        "domain_names": list(DOMAINS),
    }


def run(
    name: str,
    seed: int,
    corpus: Corpus,
    cfg: ArenaConfig,
    progress: Callable[[int], None] | None = None,
    trace_path: Path | None = None,
) -> dict:
    """Train and evaluate one entry; returns the result document (not yet written).

    With ``trace_path``, the trained model's routing of the validation windows (``routing_trace``)
    is also saved there (``torch.save``, written atomically), with the run's provenance.
    """
    runs, note = applicability(name)
    base = {
        "name": name,
        "kind": "baseline" if name in BASELINES else ("preset" if name in impls.PRESETS else "router"),
        "seed": seed,
        "config": cfg.describe(),
        "note": note,
    }
    if name not in BASELINES:
        base["router"] = _router_class(name).name
        base["arena_options_notes"] = router_options(name, cfg)[1]
    if not runs:
        return {**base, "status": "not_applicable", "provenance": provenance(corpus)}
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        try:
            model, built = build_model(name, cfg)
        except (ValueError, TypeError) as exc:
            return {
                **base,
                "status": "not_applicable",
                "note": f"cannot be built with {cfg.model.num_experts} experts: {exc}",
                "provenance": provenance(corpus),
            }
        layers = moe_layers(model)
        if layers and not layers[0].router.train().is_causal:
            base["note"] = (
                "caveat: not causal. A token's routing depends on other tokens of the batch, later ones "
                "included (" + _why_not_causal(layers[0].router) + "); validation is routed the same way, "
                "so its loss may profit from that"
            )
        trained = _train(name, model, seed, corpus, cfg, progress)
        prov = provenance(corpus)
        if trace_path is not None:
            val = Batches(corpus, cfg.model.seq_len, seed).validation(cfg.eval_windows)
            trace = routing_trace(model, val)
            trace.update(name=name, seed=seed, provenance=prov, config=cfg.describe())
            trace_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = trace_path.with_name(trace_path.name + ".tmp")
            torch.save(trace, tmp)
            os.replace(tmp, trace_path)
        return {**base, **built, **trained, "status": "ok", "provenance": prov}
    finally:
        torch.set_num_threads(threads)


def _why_not_causal(router) -> str:
    if router.name == "lory":
        return "the first segment routes on its own average, as in the paper"
    if router.name == "laser":
        return "in evaluation a flat token takes the least-loaded candidates, loads counted over the batch"
    if not type(router).causal:
        return "the routing rule itself: experts choose tokens, or a transport plan couples the batch"
    return "the capacity limit: which tokens overflow depends on the others"


def _train(name, model, seed, corpus, cfg, progress) -> dict:
    data = Batches(corpus, cfg.model.seq_len, seed)
    val = data.validation(cfg.eval_windows)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    thor = bool(moe_layers(model)) and moe_layers(model)[0].router.name == "thor"
    # StableMoE: stage 1 (learn and distill the routing) for the paper's 10% of the steps, then frozen
    staged = [layer.router for layer in moe_layers(model) if hasattr(layer.router, "freeze_routing")]
    freeze_at = max(1, round(STAGE1_FRACTION * cfg.steps))
    curve, prev_top = [], None
    timer = _RouterTimer(model)
    train_time = 0.0
    train_losses = []
    try:
        for step in range(cfg.steps + 1):
            if step % cfg.eval_every == 0 or step == cfg.steps:
                timer_before = timer.total
                point, prev_top = evaluate(model, val, prev_top)
                timer.total = timer_before  # evaluation time is not training time
                curve.append({"step": step, "tokens": step * cfg.batch * cfg.model.seq_len, **point})
            if step == cfg.steps:
                break
            x, y, dom = data.next(cfg.batch)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            t0 = time.perf_counter()
            ce, aux, _, logits = _lm_loss(model, x, y, dom)
            loss = ce + aux
            if thor:  # THOR: a second pass with a fresh expert draw, and the consistency regularizer
                ce_b, _, _, logits_b = _lm_loss(model, x, y, dom)
                alpha = THOR_ALPHA.get(name, 1.0)
                loss = ce + ce_b + alpha * thor_consistency_loss(logits, logits_b, reduction="mean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            impls.step_routers(model)  # between-step router state (aux-loss-free bias, ReMoE's lambda)
            if staged and step + 1 == freeze_at:
                for router in staged:
                    router.freeze_routing()
            train_time += time.perf_counter() - t0
            train_losses.append(float(ce.detach()))
            if progress is not None:
                progress(1)
    finally:
        timer.remove()
    tokens = cfg.steps * cfg.batch * cfg.model.seq_len
    final = curve[-1]
    m = cfg.model
    if moe_layers(model):
        layer = moe_layers(model)[0]
        shared = layer.shared.mlp.d_hidden if layer.shared is not None else 0
        # merged experts compute one expert per token, whatever number of experts the merge weights
        per_token = 1.0 if layer.router.plan_type == "merge" else final["routing"]["experts_per_token"]
        active = per_token * m.d_hidden + shared
    else:
        active = model.blocks[0].ffn.w1.out_features
    return {
        "active_ffn_width": active,
        "parameters": params,
        "curve": curve,
        "train_loss_last": sum(train_losses[-10:]) / max(1, len(train_losses[-10:])),
        "final": {k: v for k, v in final.items() if k not in ("step", "tokens")},
        "speed": {
            "train_tokens": tokens,
            "train_seconds": train_time,
            "tokens_per_second": tokens / train_time if train_time else 0.0,
            "router_share": timer.total / train_time if train_time else 0.0,
        },
    }
