"""The Arena page and each router page's arena section, drawn from the committed run results."""

from __future__ import annotations

import math
from typing import Any

from scripts.sitegen.arena import Summary, claims, summarize
from scripts.sitegen.context import GEN, SiteContext, family_doc, work_doc
from scripts.sitegen.routers import RouterFamily
from scripts.sitegen.svg import hbars, line_chart, scatter
from scripts.sitegen.text import h, href, md, rel

ARENA = f"{GEN}/arena.md"
DOMAINS = ("en", "de", "py")
HIGHLIGHT = ("dense_active", "dense_total", "switch_base", "gshard_top2", "efficient_routing_ot", "ssr")


def _f(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _num_cell(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return '<td data-missing="">—</td>'
    if abs(x) < 0.5 * 10 ** -(digits or 0):
        x = 0.0  # a rounding-size value (an MI of -1e-17) shows as 0, not -0.000
    return f'<td data-value="{x:.6g}">{x:.{digits}f}</td>'


def _family_link(ctx: SiteContext, doc: str, name: str) -> str:
    for fam in ctx.families:
        if name in {r.name for r in fam.routers} | {p.name for p in fam.presets}:
            return f'<a href="{h(href(doc, family_doc(fam.name)))}"><code>{_breakable(name)}</code></a>'
    return f"<code>{_breakable(name)}</code>"


def _breakable(name: str) -> str:
    """A registry name that may wrap after its underscores in a narrow column."""
    return "_<wbr>".join(h(part) for part in name.split("_"))


#: the three tables' columns: (heading, type, value of a Summary, digits)
MAIN_COLUMNS = (
    ("Kind", "text", lambda s: s.kind, None),
    ("Seeds", "number", lambda s: len(s.seeds), 0),
    ("Val bpb", "number", lambda s: s.final("val_bpb")[0], 3),
    ("± seeds", "number", lambda s: s.final("val_bpb")[1] if len(s.seeds) > 1 else None, 3),
    ("Tokens/s", "number", lambda s: s.speed("tokens_per_second"), 0),
    ("Active FFN", "number", lambda s: s.active_width(), 0),
)
BALANCE_COLUMNS = (
    ("Max/ mean", "number", lambda s: s.routing("max_over_mean"), 2),
    ("Gini", "number", lambda s: s.routing("gini"), 3),
    ("CV", "number", lambda s: s.routing("cv"), 2),
    ("Dropped", "number", lambda s: s.routing("fraction_dropped"), 3),
    ("Top changed", "number", lambda s: s.routing("top_expert_changed"), 3),
    ("MI bits", "number", lambda s: s.routing("domain_mi_bits"), 3),
)
DETAIL_COLUMNS = (
    *((f"bpb {d}", "number", (lambda s, d=d: s.bpb_domain(d)), 3) for d in DOMAINS),
    ("Router share", "number", lambda s: s.speed("router_share"), 3),
    ("Entropy", "number", lambda s: s.routing("entropy"), 3),
    ("Confidence", "number", lambda s: s.routing("confidence"), 3),
)


def _name_cell(ctx: SiteContext, doc: str, name: str) -> str:
    return f"<td>{_family_link(ctx, doc, name)}</td>"


def results_table(
    ctx: SiteContext, doc: str, summaries: list[Summary], table_id: str, columns=MAIN_COLUMNS
) -> list[str]:
    """A sortable HTML table: one row per entry that ran (means over seeds)."""
    out = [
        '<div class="md-typeset__scrollwrap"><div class="md-typeset__table">'
        f'<table class="atlas-table atlas-sortable" id="{h(table_id)}"><thead><tr>'
        '<th data-type="text" scope="col">Name</th>'
    ]
    out += [f'<th data-type="{t}" scope="col">{h(n)}</th>' for n, t, _, _ in columns]
    out.append("</tr></thead><tbody>")
    for s in summaries:
        cells = [_name_cell(ctx, doc, s.name)]
        for _, kind, value, digits in columns:
            v = value(s)
            cells.append(f"<td>{h(str(v))}</td>" if kind == "text" else _num_cell(v, digits))
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div></div>")
    return ["".join(out), ""]


def _late(curve: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The checkpoints from a quarter of the training on (where the routers differ)."""
    if not curve:
        return curve
    end = curve[-1][0]
    return [p for p in curve if p[0] >= end / 4]


def _setup(results: list[dict[str, Any]]) -> list[str]:
    ok = [r for r in results if r["status"] == "ok"]
    if not ok:
        return []
    cfg = ok[0]["config"]
    m = cfg["model"]
    tokens = cfg["steps"] * cfg["batch"] * m["seq_len"]
    return [
        f"Every run trains the same byte-level decoder ({m['n_layers']} layers, d_model {m['d_model']}, "
        f"{m['n_heads']} heads, context {m['seq_len']} bytes) whose feed-forward blocks are MoE layers with "
        f"{m['num_experts']} experts of hidden width {m['d_hidden']}, for {cfg['steps']} steps of "
        f"{cfg['batch']} windows ({tokens:,} training bytes), AdamW (lr {cfg['lr']:g}, β = 0.9/0.95, "
        f"weight decay {cfg['weight_decay']:g}), {cfg['warmup']} warm-up steps then a cosine to 10%, "
        f"gradient clipping at {cfg['clip']:g}. Validation: {cfg['eval_windows']} fixed windows per domain, "
        f"every {cfg['eval_every']} steps. The data order is the same for every router with the same seed. "
        "A preset keeps its paper's options and loss weights; bare routers share the default loss "
        "weights of `scripts/arena/harness.py`. The two dense baselines have the active FFN width of a "
        f"top-2 router (`dense_active`, {2 * m['d_hidden']}) and the total FFN parameters of the MoE "
        f"(`dense_total`, {m['num_experts'] * m['d_hidden']}). Every run sees the same training "
        "bytes; the compute per token is each router's own (its paper's k, shared experts, dense or "
        "merged mixtures) and is shown as the active FFN width.",
        "",
    ]


def _provenance(results: list[dict[str, Any]]) -> list[str]:
    prov = [r["provenance"] for r in results]
    commits = sorted({p.get("commit", "") for p in prov})
    dates = sorted(p.get("date", "") for p in prov)
    torches = sorted({p.get("torch", "") for p in prov})
    machines = sorted({p.get("machine", "") for p in prov})
    corpora = sorted({p.get("corpus_manifest_sha256", "")[:12] for p in prov})
    secs = sum(r["speed"]["train_seconds"] for r in results if r["status"] == "ok")
    return [
        "## Provenance",
        "",
        f"{len(results)} result files in `scripts/arena/results/`, written by `scripts/arena_run.py` "
        f"between {h(dates[0])} and {h(dates[-1])}: commit(s) {', '.join(f'`{c[:12]}`' for c in commits)}, "
        f"torch {', '.join(torches)}, {h('; '.join(machines))}, corpus manifest {', '.join(corpora)}. "
        f"Training time of all runs together: {secs / 60:.0f} min.",
        "",
    ]


def arena_page(ctx: SiteContext, results: list[dict[str, Any]]) -> str:
    doc = ARENA
    out = [
        "---",
        "hide:",
        "  - navigation",
        "---",
        "",
        "# Routing arena",
        "",
        "Every router and preset of this site trained on the same real text with the same model, data "
        "and budget, so that their quality, speed, balance and specialization can be compared on one "
        "harness. The corpus mixes three domains from Debian packages: English prose (`fortunes`), "
        "German prose (`fortunes-de`) and Python source (`libpython3.11-stdlib`), split by document "
        "(`scripts/arena_corpus.py`, manifest `scripts/arena/corpus_manifest.json`). The model reads "
        "bytes: no tokenizer to train or version, bits per byte that compare across domains, and the "
        "hash router's token id is the byte. Reproduce with "
        "`python scripts/arena_corpus.py && python scripts/arena_run.py`.",
        "",
    ]
    if not results:
        out += ["No arena results are committed yet.", ""]
        return "\n".join(out)
    summaries = summarize(results)
    ran = sorted((s for s in summaries.values() if s.ok), key=lambda s: s.final("val_bpb")[0])
    na = sorted((s for s in summaries.values() if not s.ok), key=lambda s: s.name)
    out += _setup(results)
    out += [
        "## Results",
        "",
        "Means over seeds at the end of training, on validation text; click a heading to sort. "
        "*Val bpb*: bits per byte (lower is better), averaged over the three domains. Below, *max/mean* "
        "and *Gini* of the load: tokens per expert (token-equivalents for merged experts), averaged "
        "over layers; *top changed*: "
        "the share of validation tokens whose top expert changed since the previous checkpoint. "
        "*MI bits*: mutual information between a token's domain and its expert, out of "
        "log2(3) = 1.585 bits.",
        "",
    ]
    out += results_table(ctx, doc, ran, "atlas-arena")
    out += [
        "*Active FFN*: the hidden units that compute a token (experts per token × expert width, "
        "plus shared experts); a top-2 router has 512.",
        "",
        "### Balance and specialization",
        "",
    ]
    out += results_table(ctx, doc, ran, "atlas-arena-balance", BALANCE_COLUMNS)
    out += [
        "### Per domain and router details",
        "",
        "Bits per byte on each domain, the share of training time spent in routers, the entropy of the "
        "router's scores (in nats) and their largest value per token (confidence).",
        "",
    ]
    out += results_table(ctx, doc, ran, "atlas-arena-details", DETAIL_COLUMNS)
    series = [(s.name, _late(s.curve(0) or s.curve())) for s in ran]
    out += [
        "## Loss curves",
        "",
        "Validation bits per byte against training bytes, seed 0, from a quarter of the training on "
        "(before that every curve falls from 8 bits together); highlighted: the dense baselines and "
        "the routers of the seed papers' claims (hover a curve for its name).",
        "",
        line_chart(series, "training bytes", "validation bits per byte", highlight=HIGHLIGHT),
        "",
        "## Quality against balance",
        "",
        scatter(
            [
                (s.name, s.routing("max_over_mean"), s.final("val_bpb")[0])
                for s in ran
                if s.routing("max_over_mean")
            ],
            "max/mean expert load (1 = even)",
            "validation bits per byte",
            labelled=HIGHLIGHT,
        ),
        "",
        "Labelled: the routers of the seed papers' claims (the dense baselines have no router); "
        "hover any dot for its name and values.",
        "",
        "## Speed",
        "",
        "Training tokens per second on this machine (forward, backward and optimizer step).",
        "",
        hbars(
            sorted(((s.name, s.speed("tokens_per_second")) for s in ran), key=lambda t: -t[1]),
            "tokens per second",
        ),
        "",
        "## Specialization",
        "",
        "Mutual information between domain and expert (bits); 1.585 means every domain has experts "
        "of its own.",
        "",
        hbars(
            sorted(
                (
                    (s.name, max(0.0, s.routing("domain_mi_bits") or 0.0))
                    for s in ran
                    if s.routing("domain_mi_bits") is not None
                ),
                key=lambda t: -t[1],
            ),
            "bits",
        ),
        "",
        "## The seed papers' claims at small scale",
        "",
    ]
    for c in claims(summaries):
        link = f"[{md(c.source)}]({rel(doc, work_doc(c.slug))})" if c.slug in ctx.cat else md(c.source)
        out += [f"### {md(c.title)}", "", f"*Claim:* {link}. *Setting:* {c.setting}.", ""]
        out += [f"- {m}" for m in c.measured]
        out += ["", f"**{md(c.verdict)}**", ""]
    if na:
        out += ["## Not run", "", "| Name | Why |", "|---|---|"]
        out += [f"| `{s.name}` | {md(s.note)} |" for s in na]
        out.append("")
    caveats = [s for s in ran if s.note]
    if caveats:
        out += ["## Caveats", "", "| Name | Caveat |", "|---|---|"]
        out += [f"| `{s.name}` | {md(s.note)} |" for s in caveats]
        out.append("")
    out += _provenance(results)
    return "\n".join(out)


def family_arena(ctx: SiteContext, fam: RouterFamily, results: list[dict[str, Any]]) -> list[str] | None:
    """The arena section of a router page, or ``None`` when no entry of the family was run."""
    names = [r.name for r in fam.routers] + [p.name for p in fam.presets]
    summaries = summarize([r for r in results if r["name"] in names])
    if not summaries:
        return None
    doc = family_doc(fam.name)
    ran = [summaries[n] for n in names if n in summaries and summaries[n].ok]
    na = [summaries[n] for n in names if n in summaries and not summaries[n].ok]
    out = [
        "## Measured behaviour",
        "",
        f"Trained in the [routing arena]({rel(doc, ARENA)}) on real text (English and German prose, "
        "Python source) with the same model, data and budget as every other router; means over seeds, "
        "at the end of training, on validation text.",
        "",
    ]
    if ran:
        out += results_table(ctx, doc, ran, f"atlas-arena-{fam.name}")
        out += results_table(ctx, doc, ran, f"atlas-arena-{fam.name}-balance", BALANCE_COLUMNS)
        out += results_table(ctx, doc, ran, f"atlas-arena-{fam.name}-details", DETAIL_COLUMNS)
        everyone = summarize(results)
        series = [(s.name, _late(s.curve(0) or s.curve())) for s in everyone.values() if s.ok]
        out += [
            line_chart(series, "training bytes", "validation bits per byte", highlight=[s.name for s in ran]),
            "",
            "The highlighted curves are this page's routers; the faint ones are every other arena run.",
            "",
        ]
    for s in ran:
        if s.note:
            out += [f"- `{s.name}`: {md(s.note)}"]
    for s in na:
        out += [f"- `{s.name}` was not run: {md(s.note)}"]
    out.append("")
    return out
