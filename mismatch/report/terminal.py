"""The terminal's tables: the pair table of scan and analyze, the diagnosis table, a training step's line."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from mismatch.report.values import number, span, tokens_cell
from mismatch.stats.metrics import PairRow


def pair_table_view(pairs: list[PairRow]) -> Table:
    table = Table(title="Training-inference mismatch, ℓ = log π(trainer) − log μ(engine)")
    for column in (
        "engine→trainer",
        "tokens",
        "k3",
        "k3 95% CI",
        "k1",
        "mean|Δp|",
        "max|Δp|",
        "max ratio",
        ">2×",
        "seq KL",
        "slope/1k",
    ):
        table.add_column(column, justify="right", no_wrap=True)
    for p in pairs:
        table.add_row(
            f"{p['engine_dtype']}→{p['trainer_dtype']}",
            tokens_cell(p),
            number(p["k3"]),
            span(p.get("k3_ci_low"), p.get("k3_ci_high"), ".1e"),
            number(p["k1"], ".1e"),
            number(p["mean_abs_dp"], ".1e"),
            number(p["max_abs_dp"], ".3f"),
            number(p["max_ratio"], ".3f"),
            number(p["frac_outside_2"], ".3f"),
            number(p["seq_kl"], ".1e"),
            number(p["seq_slope_per_1k"], ".1e"),
        )
    return table


def diagnosis_table_view(components: list[dict[str, Any]]) -> Table:
    table = Table(title="Where the gap comes from: k3 between two scorings of the same tokens")
    for column in ("engine dtype", "component", "k3", "k3 95% CI", "mean|Δ log p|", "max|Δ log p|", "tokens"):
        table.add_column(column, justify="right", no_wrap=True)
    for c in components:
        table.add_row(
            c["engine_dtype"],
            c["name"],
            number(c["k3"]),
            span(c["k3_ci_low"], c["k3_ci_high"], ".1e"),
            number(c["mean_abs_dlogp"], ".1e"),
            number(c["max_abs_dlogp"], ".1e"),
            str(c["n_tokens"]),
        )
    return table


def step_line(dtype: str, row: dict[str, Any]) -> str:
    """One training step's line (a row of metrics.parquet)."""
    skipped = " [red]skipped[/]" if row["skipped"] else ""
    return (
        f"{dtype} step {row['step']:>3}  reward {row['reward_mean']:.3f}  acc {row['accuracy']:.3f}  "
        f"k3 {row['k3']:.2e}  mean|Δp| {row['mean_abs_dp']:.2e}  ratio {row['min_ratio']:.3f}–{row['max_ratio']:.3f}  "
        f"grad {row['grad_norm']:.3f}  scale {row['loss_scale']:g}  entropy {row['entropy']:.2f}  "
        f"len {row['response_len']:.0f}  {row['step_time']:.1f}s{skipped}"
    )
