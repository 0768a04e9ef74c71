"""training.html: one or more `mismatch train` runs side by side (e.g. BF16 against FP16)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from mismatch.report import plots
from mismatch.report.html import environment
from mismatch.runs import load_train


def curves(steps: dict[str, pd.DataFrame]):
    """Reward, accuracy and k3 (log scale) over steps, one line per dtype."""
    fig, axes = plt.subplots(1, 3, figsize=(plots.PANEL * 3.2, plots.PANEL))
    for dtype, frame in steps.items():
        color = plots.COLORS.get(dtype, "#444")
        axes[0].plot(frame["step"], frame["reward_mean"], marker="o", ms=3, color=color, label=dtype)
        axes[1].plot(frame["step"], frame["accuracy"], marker="o", ms=3, color=color, label=dtype)
        axes[2].plot(frame["step"], frame["k3"], marker="o", ms=3, color=color, label=dtype)
    axes[0].set(title="reward (mean)", xlabel="step")
    axes[1].set(title="accuracy", xlabel="step")
    axes[2].set(title="k3 between μ and π_θ′", xlabel="step", yscale="log")
    for ax in axes:
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def verdict(steps: dict[str, pd.DataFrame]) -> str:
    """A sentence from the numbers: how the dtypes' mismatch and rewards compare."""
    parts = []
    if {"bf16", "fp16"} <= set(steps):
        joined = steps["bf16"][["step", "k3"]].merge(
            steps["fp16"][["step", "k3"]], on="step", suffixes=("_bf16", "_fp16")
        )
        above = int((joined["k3_bf16"] > joined["k3_fp16"]).sum())
        ratio = float(np.median(joined["k3_bf16"] / joined["k3_fp16"]))
        parts.append(f"BF16's k3 was above FP16's at {above} of {len(joined)} steps (median ratio {ratio:.1f}×).")
    for dtype, frame in steps.items():
        half = max(1, len(frame) // 2)
        second = frame["accuracy"].iloc[half:].mean() if len(frame) > 1 else frame["accuracy"].iloc[0]
        parts.append(
            f"{dtype}: accuracy {frame['accuracy'].iloc[:half].mean():.3f} in the first half of the steps → "
            f"{second:.3f} in the second; {int(frame['skipped'].sum())} skipped step(s)."
        )
    return " ".join(parts)


def render_training(folders: dict[str, Path]) -> str:
    loaded = {dtype: load_train(folder) for dtype, folder in folders.items()}
    steps = {dtype: run.steps for dtype, run in loaded.items()}
    tokens = pd.concat([run.tokens for run in loaded.values() if len(run.tokens)], ignore_index=True)
    first = int(tokens["step"].min())
    last = int(tokens["step"].max())
    summary = next(iter(loaded.values())).summary
    config = summary["config"]
    table = pd.concat([frame.assign(dtype=dtype) for dtype, frame in steps.items()], ignore_index=True)
    return (
        environment()
        .get_template("training.html.j2")
        .render(
            title=f"mismatch train · {config['model']} · {' vs '.join(folders)}",
            config=config,
            policy=summary.get("policy"),
            verdict=verdict(steps),
            curves=plots.to_data_uri(curves(steps)),
            scatter_first=plots.to_data_uri(plots.scatter(tokens[tokens["step"] == first])),
            scatter_last=plots.to_data_uri(plots.scatter(tokens[tokens["step"] == last])),
            first=first,
            last=last,
            columns=[
                "dtype",
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
            ],
            rows=table.to_dict("records"),
        )
    )
