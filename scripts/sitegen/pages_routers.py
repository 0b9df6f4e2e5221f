"""The router index and one page per router family (``impls/routers/<group>/<family>.py``)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from scripts.sitegen.context import (
    ROUTERS_INDEX,
    ROUTERS_INTEROP,
    SiteContext,
    family_doc,
    node_doc,
    work_doc,
)
from scripts.sitegen.pages_arena import family_arena
from scripts.sitegen.pages_works import work_link
from scripts.sitegen.routers import Measurement, MeasureSetup, RouterFamily
from scripts.sitegen.svg import load_bars
from scripts.sitegen.text import code, fence, h, md, rel


def _fmt(x: float, digits: int = 2) -> str:
    return "—" if math.isnan(x) else f"{x:.{digits}f}"


def demote_headings(text: str) -> str:
    """Push every Markdown heading outside code blocks one level down (``##`` -> ``###``)."""
    out, fence_marker = [], None
    for line in text.splitlines():
        stripped = line.lstrip()
        m = re.match(r"(`{3,}|~{3,})", stripped)
        if m and (fence_marker is None or stripped.startswith(fence_marker)):
            fence_marker = None if fence_marker else m.group(1)
        elif fence_marker is None and re.match(r"#{1,5} ", line):
            line = "#" + line
        out.append(line)
    return "\n".join(out)


def _groups(ctx: SiteContext) -> list[str]:
    """The taxonomy groups that have families, in the survey's order (``impls.routers.GROUPS``)."""
    from impls.routers import GROUPS

    order = {g: i for i, g in enumerate(GROUPS)}
    return sorted({f.group for f in ctx.families}, key=lambda g: (order.get(g, len(order)), g))


def routers_nav(ctx: SiteContext) -> list[dict[str, list[dict[str, str]]]]:
    """Nav entries under "Routers": one section per taxonomy group, one page per family."""
    from impls.routers import GROUPS

    return [
        {GROUPS.get(g, (g, None))[0]: [{f.name: family_doc(f.name)} for f in ctx.families if f.group == g]}
        for g in _groups(ctx)
    ]


def routers_index(ctx: SiteContext) -> str:
    doc = ROUTERS_INDEX
    example = next((f.presets[0].name for f in ctx.families if f.presets), None)
    example = example or (ctx.families[0].routers[0].name if ctx.families else "<router or preset name>")
    out = [
        "# Routers",
        "",
        "Reference PyTorch routers from the `impls` package, one page per family "
        "(`impls/routers/<group>/<family>.py`, grouped as the survey's gating taxonomy). Every page "
        "explains the method with its equations, shows the "
        "module's real source, runs each router on the same skewed synthetic batch at build time, and "
        "documents the API. Build any of them by registry or preset name:",
        "",
        fence(
            "import torch\nimport impls\n\n"
            f'router = impls.build_router("{example}", d_model=64, num_experts=8)\n'
            "plan = router(torch.randn(2048, 64))\nprint(plan.diagnostics())",
            "python",
        ),
        "",
    ]
    if not ctx.families:
        out += ["No routers are registered yet.", ""]
        return "\n".join(out)
    from impls.routers import GROUPS

    for group in _groups(ctx):
        title, node = GROUPS.get(group, (group, None))
        out += [f"## {md(title)}", ""]
        if node is not None and node in ctx.cat.taxonomy.nodes:
            branch = ctx.cat.taxonomy.nodes[node]
            out += [
                f"Survey branch: [{md(branch.title)}]({rel(doc, node_doc(branch))}) · "
                f"`impls/routers/{group}/`",
                "",
            ]
        out += ["| Family | Routers | Presets | Papers |", "|---|---|---|---|"]
        for fam in (f for f in ctx.families if f.group == group):
            routers = ", ".join(f"`{r.name}`" for r in fam.routers)
            presets = ", ".join(f"`{p.name}`" for p in fam.presets) or "—"
            papers = (
                ", ".join(
                    f"[{md(ctx.cat.work(s).display_name)}]({rel(doc, work_doc(s))})"
                    if s in ctx.cat
                    else f"`{s}`"
                    for s in fam.papers
                )
                or "—"
            )
            link = f"[{md(fam.title)}]({rel(doc, family_doc(fam.name))}) (`{fam.name}`)"
            out.append(f"| {link} | {routers} | {presets} | {papers} |")
        out.append("")
    return "\n".join(out)


def _measure_table(fam: RouterFamily) -> list[str]:
    rows = [
        '<div class="atlas-measure" markdown="1">',
        "",
        "| Name | E | Max/ mean | Load per expert | Dropped | Experts/ token | Confi- dence | ms |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    failed: list[Measurement] = []
    for m in fam.measurements:
        if m.error:
            failed.append(m)
            continue
        rows.append(
            f"| `{m.name}`{'' if m.kind == 'router' else ' (preset)'} | {m.num_experts} "
            f"| {_fmt(m.load_max_over_mean)} | {load_bars(list(m.load), width=90)} "
            f"| {m.fraction_dropped:.1%} | {_fmt(m.experts_per_token)} | {_fmt(m.router_confidence, 3)} "
            f"| {_fmt(m.forward_ms)} |"
        )
    out = [*rows, "", "</div>", ""]
    for m in failed:
        out += [f'!!! failure "`{m.name}` could not be measured"', "", f"    {md(m.error or '')}", ""]
    return out


RESULTS = Path(__file__).resolve().parents[1] / "results"


def _sinkhorn_balance() -> list[str]:
    """The selected-load measurement of ``scripts/measure_sinkhorn_balance.py``, if it was run."""
    path = RESULTS / "sinkhorn_balance.json"
    if not path.exists():
        return []
    doc = json.loads(path.read_text(encoding="utf-8"))
    worst: dict[tuple[int, int, float], float] = {}
    iters: dict[float, int] = {}
    for r in doc["rows"]:
        key = (r["experts"], r["k"], r["epsilon"])
        worst[key] = max(worst.get(key, 0.0), r["selected_max_over_mean"])
        iters[r["epsilon"]] = max(iters.get(r["epsilon"], 0), r["iterations"])
    shapes = sorted({(e, k) for e, k, _ in worst})
    epsilons = sorted(iters)
    prov = doc["provenance"]
    out = [
        "### Selected load against ε under skew",
        "",
        "Largest *selected* load over the mean (the busiest expert after each token takes the top-$k$ "
        "of its plan row), worst case over the skews and seeds measured, and the most Sinkhorn "
        f"iterations needed (tolerance 1e-4); {doc['tokens']} tokens per batch. The plan's marginals "
        "are balanced in every cell; the selection is not. Produced by "
        f"`{prov['script']}` at commit `{prov['commit'][:12]}` (torch {prov['torch']}, {prov['machine']}, "
        f"{prov['date']}).",
        "",
        "| ε | " + " | ".join(f"E = {e}, k = {k}" for e, k in shapes) + " | iterations |",
        "|---:|" + "---:|" * (len(shapes) + 1),
    ]
    for eps in epsilons:
        cells = " | ".join(f"{worst[(e, k, eps)]:.3f}" for e, k in shapes)
        out.append(f"| {eps:g} | {cells} | {iters[eps]} |")
    return [*out, ""]


#: measurements beyond the standard table, by family
EXTRA_MEASUREMENTS = {"sinkhorn": _sinkhorn_balance}


def family_page(ctx: SiteContext, fam: RouterFamily, setup: MeasureSetup) -> str:
    doc = family_doc(fam.name)
    names = ", ".join(f"`{r.name}`" for r in fam.routers)
    out = [f"# {md(fam.title)}", ""]
    if fam.lead:
        out += [f'<p class="atlas-subtitle">{h(fam.lead)}</p>', ""]
    out += [
        f"Family `{fam.name}` · module `{fam.module}` · routers {names}"
        + (f" · presets {', '.join(f'`{p.name}`' for p in fam.presets)}" if fam.presets else ""),
        "",
    ]
    if fam.body:
        out += ["## Method", "", demote_headings(fam.body), ""]

    out += ["## Routers", "", "| Registry name | Class | Causal | Papers |", "|---|---|---|---|"]
    for r in fam.routers:
        papers = ", ".join(work_link(ctx, doc, s) for s in r.papers) or "—"
        out.append(f"| `{r.name}` | `{r.cls_name}` | {'yes' if r.causal else 'no'} | {papers} |")
    out.append("")

    out += ["## Presets", ""]
    if fam.presets:
        for p in fam.presets:
            opts = ", ".join(code(f"{k}={v!r}") for k, v in p.options.items()) or "defaults"
            out += [f"### `{p.name}`", "", md(p.description) if p.description else "", ""]
            out += [f"- Router: `{p.router}`; options: {opts}"]
            if p.num_experts is not None:
                out.append(f"- Experts in the paper: {p.num_experts}")
            papers = ", ".join(work_link(ctx, doc, s) for s in p.papers) or "—"
            out += [f"- Papers: {papers}", f"- Deviations: {md(p.deviations)}", ""]
    else:
        out += ["No paper presets for this family.", ""]

    out += ["## Papers implemented", ""]
    implementing = [w.slug for w in ctx.cat.works if fam.name in ctx.families_of(w)]
    slugs = list(dict.fromkeys([*fam.papers, *implementing]))
    out += [f"- {work_link(ctx, doc, s)}" for s in slugs] if slugs else ["No catalog work is linked yet."]
    out.append("")

    arena = family_arena(ctx, fam, ctx.arena)
    if arena is not None:
        out += arena
    else:
        out += ["## Measured behaviour", "", f"Measured when this site was built: {setup.describe()}.", ""]
        out += _measure_table(fam)
        out += [
            "*Max/mean load* is the busiest expert's token count over the mean (1.00 = perfectly even); "
            "the bars show tokens per expert with the dashed line at the mean. *Dropped* is the share of "
            "chosen assignments over capacity; *experts / token* counts the experts that compute each "
            "token after drops; *confidence* is the mean largest router score per token; *ms* is the "
            "router's forward time.",
            "",
        ]
        if any(r.plan_type != "tokens" for r in fam.routers):
            out += [
                "These routers assign no token to an expert: every token reaches every expert with a "
                "weight (its combine weights over the slots, for Soft MoE; its group's merge weights, "
                "for merged experts). The *load* is then counted in token-equivalents, each token's "
                "weights over the experts summed over the batch (the loads add up to the number of "
                "tokens); *experts / token* counts the experts with a non-zero weight, and *confidence* "
                "is the mean largest weight a token gives one expert.",
                "",
            ]
    extra = EXTRA_MEASUREMENTS.get(fam.name)
    if extra is not None:
        out += extra()

    out += ["## Source", "", f"The module as it is in the repository, `{fam.source_rel}`:", ""]
    out += ['??? example "Show the source"', ""]
    block = fence(fam.source, "python", f'linenums="1" title="{fam.source_rel}"')
    out += ["    " + line if line else "" for line in block.splitlines()]
    out.append("")

    out += ["## API", ""]
    for member in fam.api_members:
        out += [f"::: {member}", ""]
    return "\n".join(out)


def _compile_breaks() -> list[tuple[str, str, str]]:
    """``(router, mode, reason)`` for every registered router class that declares a compile break
    with its default options (read from the routers themselves)."""
    import impls
    from impls.router import Router

    rows = []
    for name, cls in sorted(impls.ROUTERS.items()):
        if type.__getattribute__(cls, "compile_break") is Router.compile_break:
            continue
        try:
            r = cls(8, 8)
        except (TypeError, ValueError):
            continue
        for mode in ("training", "eval"):
            r.train(mode == "training")
            reason = r.compile_break
            if reason:
                rows.append((name, mode, reason))
    return rows


def interop_page(ctx: SiteContext) -> str:
    """Using the routers inside transformers models, and under ``torch.compile`` (from ``impls.hf``)."""
    import inspect

    import impls.hf as hf

    doc = ROUTERS_INTEROP
    preset_of = {s.family: s for s in hf._SPECS}
    out = [
        "# In transformers models and under torch.compile",
        "",
        "`impls.hf` (install the extra: `pip install 'moe-atlas[hf]'`, transformers "
        f"`{hf.SUPPORTED_TRANSFORMERS}`) turns a Hugging Face transformers MoE block into an "
        "`impls.MoELayer` with one call, writes a layer back into a block, and replaces the routing "
        "of every MoE block of a model with any router of this catalog.",
        "",
        fence(
            "import torch\nimport transformers\n\nimport impls.hf\n\n"
            "config = transformers.MixtralConfig(\n"
            "    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,\n"
            "    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,\n"
            ")\n"
            "model = transformers.MixtralForCausalLM(config)  # random weights: nothing is downloaded\n\n"
            "block = model.model.layers[0].mlp\n"
            "layer = impls.hf.from_hf(block)  # MoELayer with the block's weights\n"
            "impls.hf.to_hf(layer, block)     # and back\n\n"
            'swapped = impls.hf.swap_routers(model, "sinkhorn_ot")  # every MoE block of the model\n'
            "optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)\n"
            "ids = torch.randint(0, 64, (2, 16))\n"
            "out = model(input_ids=ids, labels=ids)\n"
            "loss = out.loss + swapped.aux_loss()  # the routers' weighted losses\n"
            "loss.backward(); optimizer.step(); optimizer.zero_grad()\n"
            "swapped.step()                        # between-step router state",
            "python",
        ),
        "",
        "## Supported blocks",
        "",
        "| transformers block | family | preset `from_hf` builds on | swap format |",
        "|---|---|---|---|",
    ]
    for cls_name, family in sorted(hf.SUPPORTED_BLOCKS.items()):
        spec = preset_of[family]
        out.append(f"| `{cls_name}` | {md(family)} | {md(spec.preset)} | `{hf._FORMATS[family]}` |")
    out += [
        "",
        "In float32 the layer's output, routing and gradients equal the block's to 1e-5 (tested per "
        "block and per experts implementation), and `to_hf(from_hf(block), other)` reproduces the "
        "block's state dict exactly.",
        "",
        "## What differs, and how the swap works",
        "",
        demote_headings(inspect.getdoc(hf) or ""),
        "",
        "## torch.compile",
        "",
        "Every router and preset compiles with `torch.compile` on CPU, in float32 and bfloat16, and "
        "gives the eager plan (tested for every registered name, in training and evaluation). A "
        "router whose `compile_break` is `None` captures one graph (`fullgraph=True`: no graph break "
        "and no host sync); the others name the step that needs the host and compile with a break "
        "there. The layer compiles with `fullgraph=True` whenever its router does: the grouped "
        "matmul goes through an opaque `moe_atlas::grouped_mm` op for dtypes the compiler has no "
        "rules for (float32), and the bfloat16 path is lowered by the compiler.",
        "",
        "| router | mode | why it breaks the graph |",
        "|---|---|---|",
    ]
    out += [f"| `{n}` | {m} | {md(r)} |" for n, m, r in _compile_breaks()]
    out += ["", f"Back to the [router index]({rel(doc, ROUTERS_INDEX)}).", ""]
    return "\n".join(out)
