"""report.html and summary.md of a diagnose run, from its folder alone."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from mismatch.report import plots
from mismatch.report.content import engine_graphs
from mismatch.report.html import distribution_context, environment
from mismatch.report.markdown import distribution_lines, escape, routing_lines, row
from mismatch.report.values import FIXED, interval, number
from mismatch.runs import DiagnoseRun

EXPLAINED = {
    "total": "engine decode (as sampled) vs trainer, same dtype: the scan's number",
    "semantic": "engine FP32 vs trainer FP32: implementation differences",
    "engine_decode_vs_prefill": "engine decode vs engine prefill of the same sequences: KV cache, decode kernels",
    "engine_batch": "engine prefill alone vs in one large shuffled batch: engine batch variance",
    "trainer_batch": "trainer at micro-batch 1 vs a padded batch: the trainer's own noise floor",
    "engine_precision": "engine in the dtype vs engine FP32 (prefill): engine-side rounding",
    "trainer_precision": "trainer in the dtype vs trainer FP32: trainer-side rounding",
}
FLOOR = 1e-16  # k3 values at or below this are drawn at this height on the log axis


def components_chart(components: list[dict]):
    """Where the gap comes from: k3 of each component (log scale) with its interval, one group per engine dtype."""
    names = list(dict.fromkeys(c["name"] for c in components))
    dtypes = list(dict.fromkeys(c["engine_dtype"] for c in components))
    fig, ax = plt.subplots(figsize=(plots.PANEL * 2.6, plots.PANEL))
    width = 0.8 / len(dtypes)
    for i, dtype in enumerate(dtypes):
        mine = {c["name"]: c for c in components if c["engine_dtype"] == dtype}
        xs = [j + (i - (len(dtypes) - 1) / 2) * width for j, name in enumerate(names) if name in mine]
        values = [max(mine[n]["k3"], FLOOR) for n in names if n in mine]
        low = [
            max(values[k] - max(mine[n]["k3_ci_low"] or 0, FLOOR), 0)
            for k, n in enumerate(n for n in names if n in mine)
        ]
        high = [max((mine[n]["k3_ci_high"] or 0) - values[k], 0) for k, n in enumerate(n for n in names if n in mine)]
        ax.bar(
            xs,
            values,
            width=width,
            color=plots.COLORS.get(dtype, "#444"),
            label=f"engine dtype {dtype}",
            yerr=[low, high],
            capsize=2,
        )
    ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
    ax.set(yscale="log", ylabel="k3 (log scale)", title="Where the gap comes from")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def layer_chart(layers: list[dict]):
    """Relative error against FP32 along the network, and the largest |activation| per layer against 65504."""
    fig, (error_ax, peak_ax) = plt.subplots(1, 2, figsize=(plots.PANEL * 3.2, plots.PANEL))
    for entry in layers:
        rows = entry["layers"]
        color = plots.COLORS.get(entry["trainer_dtype"], "#444")
        if entry["trainer_dtype"] != "fp32":
            error_ax.plot(
                [r["index"] for r in rows],
                [max(r["relative_error"], FLOOR) for r in rows],
                marker="o",
                ms=3,
                color=color,
                label=entry["trainer_dtype"],
            )
        peaks = [(r["index"] - 1, r["fraction_of_fp16_limit"]) for r in rows if r["fraction_of_fp16_limit"] is not None]
        if peaks:
            peak_ax.plot(*zip(*peaks, strict=True), marker="o", ms=3, color=color, label=entry["trainer_dtype"])
    names = [r["name"] for r in layers[0]["layers"]]
    ticks = np.unique(np.linspace(0, len(names) - 1, min(len(names), 8)).astype(int))
    error_ax.set_xticks(ticks, [names[t] for t in ticks], fontsize=7, rotation=30)
    error_ax.set(yscale="log", title="relative error of the hidden state vs FP32", ylabel="‖x − x_fp32‖ / ‖x_fp32‖")
    peak_ax.axhline(1.0, color="#d1495b", lw=0.8, ls="--")
    peak_ax.set(yscale="log", title="largest |activation| / 65504 (FP16 limit)", xlabel="layer")
    for ax in (error_ax, peak_ax):
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def render_diagnosis(run: DiagnoseRun) -> str:
    diagnosis = run.summary["diagnosis"]
    config = run.summary["config"]
    return (
        environment()
        .get_template("diagnosis.html.j2")
        .render(
            title=f"mismatch diagnose · {config['model']}",
            config=config,
            summary=run.summary,
            engine_graphs=engine_graphs(run.summary),
            recommendation=run.summary["recommendation"],
            components=diagnosis["components"],
            explained=EXPLAINED,
            topk=diagnosis["topk"],
            routing=diagnosis.get("routing"),
            **distribution_context(run.summary.get("distribution")),
            chart=plots.to_data_uri(components_chart(diagnosis["components"])),
            layer_chart=plots.to_data_uri(layer_chart(diagnosis["layers"])),
            run_path=run.path,
        )
    )


def render_diagnosis_markdown(run: DiagnoseRun) -> str:
    recommendation = run.summary["recommendation"]
    lines = [
        f"## mismatch diagnose: {escape(run.summary['config']['model'])}",
        "",
        f"**Verdict:** {escape(recommendation['summary'])}",
        "",
    ]
    lines += [f"- {escape(action)}" for action in recommendation["actions"]]
    if graphs := engine_graphs(run.summary):
        lines += ["", f"engine graphs: {escape(graphs)}"]
    lines += [
        "",
        "| engine dtype | component | k3 [95% CI] | mean \\|Δ log p\\| | max \\|Δ log p\\| | tokens |",
        "|---|---|--:|--:|--:|--:|",
    ]
    lines += [
        row(
            [
                c["engine_dtype"],
                c["name"],
                f"{number(c['k3'])} {interval(c['k3_ci_low'], c['k3_ci_high'])}",
                number(c["mean_abs_dlogp"]),
                number(c["max_abs_dlogp"]),
                str(c["n_tokens"]),
            ]
        )
        for c in run.summary["diagnosis"]["components"]
    ]
    lines += [
        "",
        "| engine dtype | top-k | overlap with the trainer's top-k | TV on the engine's top-k |",
        "|---|--:|--:|--:|",
    ]
    lines += [
        row([t["engine_dtype"], str(t["k"]), number(t["mean_overlap"], FIXED), number(t["mean_tv_topk"])])
        for t in run.summary["diagnosis"]["topk"]
    ]
    lines += ["", *routing_lines(run.summary["diagnosis"].get("routing"))]
    lines += distribution_lines(run.summary.get("distribution"))
    lines += ["<sub>every number is recomputable from the run's tokens.parquet and topk.parquet</sub>"]
    return "\n".join(lines) + "\n"
