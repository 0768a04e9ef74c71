"""Matplotlib figures of a run, drawn from its per-token frame (tokens.parquet) only."""

from __future__ import annotations

import base64
import io

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm

from mismatch.report.values import bucket_label
from mismatch.stats.buckets import gap_by_bucket
from mismatch.stats.measures import pair_name
from mismatch.stats.metrics import log_ratio

matplotlib.use("Agg")  # files only, never a window (pyplot picks its backend at the first figure)

PANEL = 3.6  # inches per panel
COLORS = {"bf16": "#d1495b", "fp16": "#00798c", "fp32": "#30638e"}


def pair_label(engine_dtype: str, trainer_dtype: str) -> str:
    return f"{engine_dtype} → {trainer_dtype}"


def pair_groups(tokens: pd.DataFrame):
    """(engine_dtype, trainer_dtype, finite rows) in the order the pairs appear in the frame."""
    finite = tokens[np.isfinite(tokens["logp_engine"]) & np.isfinite(tokens["logp_trainer"])]
    for (engine, trainer), group in finite.groupby(["engine_dtype", "trainer_dtype"], sort=False):
        yield engine, trainer, group


def to_data_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _panels(n: int, height: float = PANEL, sharey: bool = True):
    fig, axes = plt.subplots(1, n, figsize=(PANEL * n, height), sharex=True, sharey=sharey, squeeze=False)
    return fig, axes[0]


def scatter(tokens: pd.DataFrame, worst: int = 10):
    """The paper's token-level view: μ (engine) on x, π (trainer) on y, one panel per pair.

    Points are coloured by how many tokens share their cell of a 100x100 grid (log scale), dense
    ones drawn last; the `worst` tokens by |log π − log μ| are circled.
    """
    groups = list(pair_groups(tokens))
    fig, axes = _panels(len(groups), height=PANEL + 0.3)
    edges = np.linspace(0, 1, 101)
    for ax, (engine, trainer, group) in zip(axes, groups, strict=True):
        mu = np.exp(group["logp_engine"].to_numpy())
        pi = np.exp(group["logp_trainer"].to_numpy())
        counts, _, _ = np.histogram2d(mu, pi, bins=[edges, edges])
        cell = counts[np.clip(np.digitize(mu, edges) - 1, 0, 99), np.clip(np.digitize(pi, edges) - 1, 0, 99)]
        order = np.argsort(cell)
        points = ax.scatter(
            mu[order],
            pi[order],
            c=cell[order],
            s=4,
            cmap="viridis",
            norm=LogNorm(vmin=1, vmax=max(2, cell.max())),
            rasterized=True,
            linewidths=0,
        )
        ax.plot([0, 1], [0, 1], color="#888", lw=0.8, ls="--")
        far = np.argsort(-np.abs(log_ratio(group["logp_trainer"], group["logp_engine"])))[:worst]
        ax.scatter(
            mu[far],
            pi[far],
            s=40,
            facecolors="none",
            edgecolors="#e4572e",
            linewidths=1.2,
            label=f"{len(far)} largest |ℓ|",
        )
        ax.set(
            title=pair_label(engine, trainer), xlabel="μ: engine probability", xlim=(0, 1), ylim=(0, 1), aspect="equal"
        )
        ax.legend(loc="upper left", fontsize=7, frameon=False)
    axes[0].set_ylabel("π: trainer probability")
    fig.colorbar(points, ax=list(axes), shrink=0.8, label="tokens in cell")
    return fig


def sequence_drift(tokens: pd.DataFrame):
    """Σℓ per sequence against its response length, with the least-squares line (slope per 1k tokens)."""
    groups = list(pair_groups(tokens))
    fig, axes = _panels(len(groups))
    for ax, (engine, trainer, group) in zip(axes, groups, strict=True):
        keys = ["step", "seq_id"] if "step" in group else ["seq_id"]  # an analyzed run numbers sequences per step
        seqs = (
            group.assign(ratio=log_ratio(group["logp_trainer"], group["logp_engine"]))
            .groupby(keys)
            .agg(total=("ratio", "sum"), length=("ratio", "size"))
        )
        ax.scatter(seqs["length"], seqs["total"], s=10, color=COLORS.get(trainer, "#444"), alpha=0.7)
        ax.axhline(0, color="#888", lw=0.8, ls="--")
        if seqs["length"].nunique() > 1:
            slope, intercept = np.polyfit(seqs["length"], seqs["total"], 1)
            xs = np.array([seqs["length"].min(), seqs["length"].max()])
            ax.plot(xs, slope * xs + intercept, color="#222", lw=1.2, label=f"slope {1000 * slope:+.3g} per 1k tokens")
            ax.legend(loc="best", fontsize=7, frameon=False)
        ax.set(title=pair_label(engine, trainer), xlabel="response length (tokens)")
    axes[0].set_ylabel("Σ log(π/μ) over the response")
    fig.tight_layout()
    return fig


def ratio_histogram(tokens: pd.DataFrame):
    """Histogram of ℓ = log(π/μ) per pair on a log-count axis, shared bins."""
    groups = list(pair_groups(tokens))
    ratios = [log_ratio(g["logp_trainer"], g["logp_engine"]) for _, _, g in groups]
    reach = max((np.abs(r).max() for r in ratios if len(r)), default=1.0) or 1e-6
    bins = np.linspace(-reach, reach, 81)
    fig, axes = _panels(len(groups))
    for ax, (engine, trainer, _), ratio in zip(axes, groups, ratios, strict=True):
        ax.hist(ratio, bins=bins, color=COLORS.get(trainer, "#444"), log=True)
        ax.axvline(0, color="#888", lw=0.8, ls="--")
        ax.set(title=pair_label(engine, trainer), xlabel="ℓ = log π − log μ")
    axes[0].set_ylabel("tokens (log scale)")
    fig.tight_layout()
    return fig


def position_profile(tokens: pd.DataFrame, bins: int = 16):
    """Mean |ℓ| against position in the response (equal-width position bins), one line per pair."""
    fig, ax = plt.subplots(figsize=(PANEL * 2, PANEL))
    top = max(int(tokens["position"].max()) + 1, 1)
    edges = np.unique(np.linspace(0, top, bins + 1).astype(int))
    for engine, trainer, group in pair_groups(tokens):
        which = np.clip(np.digitize(group["position"], edges) - 1, 0, len(edges) - 2)
        mean = pd.Series(np.abs(log_ratio(group["logp_trainer"], group["logp_engine"]))).groupby(which).mean()
        centres = (edges[:-1] + edges[1:]) / 2
        ax.plot(
            centres[mean.index],
            mean.to_numpy(),
            marker="o",
            ms=3,
            color=COLORS.get(engine),
            ls="-" if engine == trainer else ":",
            label=pair_label(engine, trainer),
        )
    ax.set(yscale="log", xlabel="position in the response (token)", ylabel="mean |log π − log μ|")
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


STEP_PANELS = (  # metric, title, y scale
    ("k3", "k3 (KL[μ‖π])", "log"),
    ("mean_abs_dp", "mean |π − μ|", "log"),
    ("min_ratio", "min π/μ", "linear"),
    ("max_ratio", "max π/μ", "linear"),
    ("frac_outside_2", "share outside [1/2, 2]", "linear"),
)


def over_training(steps: pd.DataFrame, drift: list[dict]):
    """Each metric per training step, one line per pair; a dotted line where it departs from its start."""
    fig, axes = _panels(len(STEP_PANELS), sharey=False)
    departs = {(d["pair"], d["metric"]): d["departs_at"] for d in drift}
    for ax, (metric, label, scale) in zip(axes, STEP_PANELS, strict=True):
        for (engine, trainer), group in steps.sort_values("step").groupby(
            ["engine_dtype", "trainer_dtype"], sort=False
        ):
            line = ax.plot(
                group["step"],
                group[metric],
                marker="o",
                ms=2,
                lw=1,
                label=pair_label(engine, trainer),
                color=COLORS.get(trainer),
            )[0]
            if (at := departs.get((pair_name(engine, trainer), metric))) is not None:
                ax.axvline(at, color=line.get_color(), ls=":", lw=1)
        if scale == "log" and (steps[metric] > 0).all():
            ax.set_yscale("log")
        ax.set(title=label, xlabel="training step")
    axes[0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def gap_by_entropy(tokens: pd.DataFrame, seed: int = 0):
    """Per pair, each bucket of the trainer's entropy at the position: its share of the tokens and of the
    total gap (Σ k3 terms), side by side, its k3 written above (`stats.buckets.gap_by_bucket`: fixed edges,
    short buckets merged). Pairs whose rows carry no entropy are left out."""
    groups = [(e, t, g) for e, t, g in pair_groups(tokens) if g["entropy"].notna().any()]
    fig, axes = plt.subplots(1, len(groups), figsize=(PANEL * 1.4 * len(groups), PANEL), sharey=True, squeeze=False)
    for ax, (engine, trainer, group) in zip(axes[0], groups, strict=True):
        table = gap_by_bucket("entropy", group["logp_trainer"], group["logp_engine"], group["entropy"])
        rows = table["rows"]
        at = np.arange(len(rows))
        ax.bar(at - 0.2, [r["token_share"] for r in rows], width=0.4, color="#bbb", label="share of tokens")
        bars = ax.bar(
            at + 0.2,
            [r["gap_share"] for r in rows],
            width=0.4,
            color=COLORS.get(trainer, "#444"),
            label="share of k3 (its k3 above)",
        )
        for bar, row in zip(bars, rows, strict=True):
            ax.annotate(
                f"{row['k3']:.1e}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=6,
            )
        ax.set_xticks(at, [bucket_label(r["low"], r["high"]) for r in rows], rotation=30, fontsize=7)
        ax.set(title=f"{pair_label(engine, trainer)} · k3 {table['k3']:.2e}", xlabel="trainer's entropy (nats)")
    axes[0][0].set_ylabel("share")
    axes[0][0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig
