"""The train report: `mismatch train` runs side by side (e.g. BF16 against FP16), over one seed or several.

Everything shown is read from the run folders: metrics.parquet per run, the first seed's
tokens.parquet (the scatters), summary.json's `impact` and `step0_check`. The verdict is written
from the validation's numbers only (`stats.validation`): a difference is called established only
when its interval excludes no change.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from mismatch.report import plots
from mismatch.report.content import GROWTH_COLUMNS, growth_rows
from mismatch.report.html import environment
from mismatch.report.values import interval, number, percent, ratio
from mismatch.runs import TrainRun, load_train
from mismatch.stats.growth import Growth, growth_sentence
from mismatch.stats.validation import ONE_SEED, Difference, Validation, step_bands, validate

Key = tuple[int, str]  # (seed, dtype)
PANELS = (("reward_mean", "reward (mean)"), ("accuracy", "accuracy"), ("k3", "k3 between μ and π_θ′"))
METRIC_NAMES = {"reward_mean": "reward", "accuracy": "accuracy", "k3": "k3"}


class TrainingValidation(Validation):
    """validation.json: `Validation`, and each dtype's step-0 check (summary.json `step0_check`)."""

    step0_checks: list[dict]


def load_runs(folders: Mapping[Key, Path], *, tokens: bool = True) -> dict[Key, TrainRun]:
    """The runs of `runs.train_runs` / `train_layout`; `tokens`: those of the first seed's runs (the scatters)."""
    first = min((seed for seed, _ in folders), default=0)
    return {(seed, dtype): load_train(f, tokens=tokens and seed == first) for (seed, dtype), f in folders.items()}


def dtypes_of(loaded: Mapping[Key, TrainRun]) -> list[str]:
    """The dtypes present, in the order --compare gave them."""
    config = next(iter(loaded.values())).summary["config"]
    present = {dtype for _, dtype in loaded}
    return [d for d in config.get("dtypes", [config["dtype"]]) if d in present]


def training_validation(loaded: Mapping[Key, TrainRun]) -> TrainingValidation:
    config = next(iter(loaded.values())).summary["config"]
    result = validate({key: run.steps for key, run in loaded.items()}, config["steps"], dtypes_of(loaded))
    checks = [run.summary["step0_check"] for run in loaded.values() if "step0_check" in run.summary]
    return {**result, "step0_checks": checks}


def runs_of(loaded: Mapping[Key, TrainRun], dtype: str) -> list[TrainRun]:
    return [run for (_, d), run in loaded.items() if d == dtype]


def curves(loaded: Mapping[Key, TrainRun], window: list[int]):
    """Reward, accuracy and k3 (log scale) over steps per dtype: the mean over seeds with its 95%
    t-band (k3's on the log scale: geometric mean), or the one run's line; the final window shaded."""
    fig, axes = plt.subplots(1, 3, figsize=(plots.PANEL * 3.2, plots.PANEL))
    for dtype in dtypes_of(loaded):
        color = plots.COLORS.get(dtype, "#444")
        frames = [run.steps for run in runs_of(loaded, dtype)]
        for ax, (column, _) in zip(axes, PANELS, strict=True):
            band = step_bands(frames, column, log=column == "k3")
            label = dtype if len(frames) == 1 else f"{dtype} ({len(frames)} seeds)"
            ax.plot(band["step"], band["mean"], marker="o", ms=3, color=color, label=label)
            if len(frames) > 1:
                ax.fill_between(band["step"], band["low"], band["high"], color=color, alpha=0.2, linewidth=0)
    for ax, (column, title) in zip(axes, PANELS, strict=True):
        ax.axvspan(window[0] - 0.5, window[1] + 0.5, color="#888", alpha=0.08, linewidth=0)
        ax.set(title=title, xlabel="step", yscale="log" if column == "k3" else "linear")
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def impact_rows(loaded: Mapping[Key, TrainRun]) -> list[dict]:
    """One row per measured step of every run (summary.json `impact`)."""
    return [
        {"seed": seed, "dtype": dtype, **measured}
        for (seed, dtype), run in loaded.items()
        for measured in run.summary.get("impact", [])
    ]


def plotted(rows: list[dict]) -> bool:
    """Whether the impact figure has a point: a ratio, a B* or a lower bound of B*."""
    return any(
        r["bias_to_noise"]["value"] is not None or r["batch_star"]["value"] is not None or r["batch_star_at_least"]
        for r in rows
    )


def impact_figure(rows: list[dict]):
    """‖b‖/σ_B at the run's batch and B* over the measured steps, per run, with their intervals; a
    B* known only from below is drawn as ▲ at its bound."""
    fig, axes = plt.subplots(1, 2, figsize=(plots.PANEL * 2.2, plots.PANEL))
    for (dtype, seed), group in pd.DataFrame(rows).groupby(["dtype", "seed"], sort=False):
        color = plots.COLORS.get(str(dtype), "#444")
        label = f"{dtype} seed {seed}"
        for ax, name in zip(axes, ("bias_to_noise", "batch_star"), strict=True):
            points = [(r["step"], r[name]) for r in group.to_dict("records") if r[name]["value"] is not None]
            if points:
                steps = np.array([s for s, _ in points], dtype=np.float64)
                value = np.array([e["value"] for _, e in points], dtype=np.float64)
                low = np.array([np.nan if e["low"] is None else e["low"] for _, e in points], dtype=np.float64)
                high = np.array([np.nan if e["high"] is None else e["high"] for _, e in points], dtype=np.float64)
                error = np.nan_to_num(np.vstack([value - low, high - value]), nan=0.0)
                ax.errorbar(steps, value, yerr=error, marker="o", ms=4, capsize=3, color=color, label=label)
        bounds = [(r["step"], r["batch_star_at_least"]) for r in group.to_dict("records") if r["batch_star_at_least"]]
        if bounds:
            axes[1].scatter(*zip(*bounds, strict=True), marker="^", color=color, label=f"{label}: B* above")
    axes[0].set(title="‖b‖ / σ_B at the run's batch", xlabel="step", yscale="log")
    axes[0].axhline(1.0, color="#888", lw=0.8, ls="--")  # the bias as large as one step's noise
    axes[1].set(title="B* (sequences)", xlabel="step", yscale="log")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def difference_text(diff: Difference, window: list[int]) -> str:
    """One sentence from one `Difference`; "established" only when its interval says so."""
    name = METRIC_NAMES[diff["metric"]]
    seeds = len(diff["seeds"])
    if not seeds:
        return f"{diff['second']} against {diff['first']}, {name}: {diff['statement']}."
    over = f"over the final window (steps {window[0]}–{window[1]}), {seeds} paired seed{'s' * (seeds > 1)}"
    if diff["scale"] == "ratio":
        value = f"{diff['second']}'s {name} is {ratio(diff['estimate'])} {diff['first']}'s"
        spread = f"95% interval {ratio(diff['low'])}–{ratio(diff['high'])}"
    else:
        value = f"{diff['second']} − {diff['first']} in {name}: {diff['estimate']:+.3f}"
        spread = f"95% interval {diff['low']:+.3f} to {diff['high']:+.3f}"
    if diff["statement"] == ONE_SEED:
        return f"{value} {over}: {ONE_SEED} (--seeds 2 or more puts one on it)."
    return f"{value} {over} ({spread}): {diff['statement']}."


def step0_text(check: dict) -> str:
    if "skipped" in check:
        return f"Step-0 check ({check['dtype']}): not run, {check['skipped']}."
    if check["low"] is None:  # fewer than two prompts a side (NaN, stored as null)
        agreement = "could not be computed (fewer than two prompts)"
    else:
        agreement = "contains 0: they agree" if check["agrees"] else "excludes 0: they disagree"
    return (
        f"Step-0 check ({check['dtype']}): train's step-0 k3 {number(check['train_k3'])}"
        f" {interval(check['train_low'], check['train_high'])}, an independent scan of the same prompts"
        f" {number(check['scan_k3'])} {interval(check['scan_low'], check['scan_high'])}; the difference's 95%"
        f" interval {interval(check['low'], check['high'])} {agreement}."
    )


def impact_text(rows: list[dict], dtypes: list[str]) -> list[str]:
    """Per dtype, the first measurement of the first seed: the bias against one step's noise, and B*."""
    parts = []
    for dtype in dtypes:
        mine = [r for r in rows if r["dtype"] == dtype]
        if not mine:
            continue
        first = min(mine, key=lambda r: (r["seed"], r["step"]))
        where = f"{dtype}, step {first['step']}"
        share = first["bias_to_noise"]
        batch = f"at a batch of {first['sequences']} sequences"
        if not first["share_groups_with_signal"]:
            text = f"{where}: no group had a non-zero advantage, so the gradient (and its bias) was zero"
        elif share["value"] is None:
            text = f"{where}: {batch} the bias against the noise could not be computed (no noise measured)"
        else:
            text = f"{where}: {batch} the bias is {percent(share['value'])} of one step's noise"
            if share["high"] is not None:
                text += f" (95% interval {percent(share['low'])}–{percent(share['high'])})"
            else:
                text += " (its interval has no upper end)"
        star = first["batch_star"]
        if star["value"] is not None:
            text += f"; they are equal at B* ≈ {star['value']:.3g} {interval(star['low'], star['high'], '.3g')}"
        elif first["batch_star_at_least"] is not None:
            text += f"; B* > {first['batch_star_at_least']:.3g}"
        if not first["measurable"]:
            text += f" (flagged: {first['reason']})"
        parts.append(text + ".")
    if parts:
        parts.append(
            "B* compares one step's bias with one step's noise; noise averages out over steps, a bias does not."
        )
    return parts


def verdict(loaded: Mapping[Key, TrainRun], result: TrainingValidation) -> list[str]:
    """The verdict's sentences, from the validation, the step-0 checks and the impact only."""
    window = result["window"]
    parts = [difference_text(diff, window) for diff in result["differences"]]
    steps = {key: run.steps for key, run in loaded.items()}
    if {"bf16", "fp16"} <= {dtype for _, dtype in steps}:
        joined = pd.concat(
            [
                steps[seed, "bf16"][["step", "k3"]].merge(
                    steps[seed, "fp16"][["step", "k3"]], on="step", suffixes=("_bf16", "_fp16")
                )
                for seed in sorted({s for s, _ in steps})
                if (seed, "bf16") in steps and (seed, "fp16") in steps
            ]
        )
        above = int((joined["k3_bf16"] > joined["k3_fp16"]).sum())
        median = float(np.median(joined["k3_bf16"] / joined["k3_fp16"]))
        where = "steps" if len(result["seeds"]) == 1 else "steps of the paired seeds"
        parts.append(f"BF16's k3 was above FP16's at {above} of {len(joined)} {where} (median ratio {median:.1f}×).")
    parts += [step0_text(check) for check in result["step0_checks"]]
    parts += impact_text(impact_rows(loaded), dtypes_of(loaded))
    for dtype in dtypes_of(loaded):
        skipped = sum(int(run.steps["skipped"].sum()) for run in runs_of(loaded, dtype))
        if skipped:
            parts.append(f"{dtype}: {skipped} skipped step(s) (FP16 loss scaling: inf/NaN gradients).")
    return parts


def validation_rows(result: TrainingValidation) -> list[dict]:
    """The validation table: per dtype pair and metric, the window means, the difference and its interval."""
    rows = []
    for diff in result["differences"]:
        is_ratio = diff["scale"] == "ratio"
        spec = ".3g" if is_ratio else "+.3f"
        rows.append(
            {
                "comparison": f"{diff['second']} {'/' if is_ratio else '−'} {diff['first']}",
                "metric": METRIC_NAMES[diff["metric"]] + (" (ratio, log scale)" if is_ratio else ""),
                "first": number(diff["first_mean"], ".3g"),
                "second": number(diff["second_mean"], ".3g"),
                "estimate": ratio(diff["estimate"]) if is_ratio else number(diff["estimate"], spec),
                "interval": ONE_SEED
                if diff["statement"] == ONE_SEED
                else interval(diff["low"], diff["high"], spec if not is_ratio else ".3g"),
                "seeds": len(diff["seeds"]),
                "established": {True: "yes", False: "no", None: "—"}[diff["established"]],
            }
        )
    return rows


def impact_table(rows: list[dict]) -> list[dict]:
    def estimate(e: dict, spec: str) -> str:
        return f"{number(e['value'], spec)} {interval(e['low'], e['high'], spec)}"

    return [
        {
            "dtype": r["dtype"],
            "seed": r["seed"],
            "step": r["step"],
            "sequences": r["sequences"],
            "bias / noise": estimate(r["bias_to_noise"], ".3g"),
            "B*": estimate(r["batch_star"], ".3g")
            if r["batch_star"]["value"] is not None
            else (f"> {r['batch_star_at_least']:.3g}" if r["batch_star_at_least"] is not None else "—"),
            "ρ ESS": number(r["rho_ess"], ".3f"),
            "measurable": "yes" if r["measurable"] else f"no: {r['reason']}",
        }
        for r in rows
    ]


STEP_COLUMNS = [
    "dtype",
    "seed",
    "step",
    "reward_mean",
    "accuracy",
    "k3",
    "mean_abs_dp",
    "max_abs_dp",
    "max_ratio",
    "grad_norm",
    "loss_scale",
    "skipped",
    "entropy",
    "response_len",
    "step_time",
    "learn_time",
    "impact_time",
]


def growths(loaded: Mapping[Key, TrainRun]) -> list[tuple[str, Growth]]:
    """(run label, summary.json `growth`) of the runs that have one (2 steps or more)."""
    several = len({seed for seed, _ in loaded}) > 1
    return [
        (dtype + (f" seed {seed}" if several else ""), run.summary["growth"])
        for (seed, dtype), run in loaded.items()
        if run.summary.get("growth")
    ]


def render_training(folders: Mapping[Key, Path]) -> str:
    """report.html of the runs keyed (seed, dtype), from their folders (`runs.train_runs`)."""
    runs = load_runs(folders)
    result = training_validation(runs)
    first_seed = result["seeds"][0]
    tokens = pd.concat(
        [run.tokens for (seed, _), run in runs.items() if seed == first_seed and len(run.tokens)], ignore_index=True
    )
    first = int(tokens["step"].min())
    last = int(tokens["step"].max())
    summary = next(iter(runs.values())).summary
    config = summary["config"]
    table = pd.concat([run.steps.assign(dtype=dtype, seed=seed) for (seed, dtype), run in runs.items()])
    impact = impact_rows(runs)
    seeds = result["seeds"]
    grown = growths(runs)
    return (
        environment()
        .get_template("training.html.j2")
        .render(
            title=f"mismatch train · {config['model']} · {' vs '.join(dtypes_of(runs))}"
            + (f" · {len(seeds)} seeds" if len(seeds) > 1 else ""),
            config=config,
            policy=summary.get("policy"),
            seeds=", ".join(map(str, seeds)),
            window=result["window"],
            verdict=verdict(runs, result),
            validation=validation_rows(result),
            curves=plots.to_data_uri(curves(runs, result["window"])),
            impact_figure=plots.to_data_uri(impact_figure(impact)) if plotted(impact) else None,
            impact=impact_table(impact),
            growth=[(label, growth_sentence(g)) for label, g in grown],
            growth_columns=GROWTH_COLUMNS,
            growth_rows=growth_rows(grown),
            first_seed=first_seed,
            scatter_first=plots.to_data_uri(plots.scatter(tokens[tokens["step"] == first])),
            scatter_last=plots.to_data_uri(plots.scatter(tokens[tokens["step"] == last])),
            first=first,
            last=last,
            columns=[c for c in STEP_COLUMNS if c in table.columns],
            rows=table[[c for c in STEP_COLUMNS if c in table.columns]].to_dict("records"),
            several=len(seeds) > 1,
        )
    )
