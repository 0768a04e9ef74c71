"""The terminal's tables: the pair table of scan and analyze, the diagnosis table, a training step's line."""

from __future__ import annotations

import math

from rich.table import Table


def _fmt(value, spec: str = ".2e") -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def pair_table_view(pairs: list[dict]) -> Table:
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
            f"{p['n_tokens']}"
            + (f" +{p['n_nonfinite']} non-finite" if p["n_nonfinite"] else "")
            + (f" +{p['n_outside_nucleus']} outside nucleus" if p["n_outside_nucleus"] else ""),
            _fmt(p["k3"]),
            f"{_fmt(p.get('k3_ci_low'), '.1e')}–{_fmt(p.get('k3_ci_high'), '.1e')}",
            _fmt(p["k1"], ".1e"),
            _fmt(p["mean_abs_dp"], ".1e"),
            _fmt(p["max_abs_dp"], ".3f"),
            _fmt(p["max_ratio"], ".3f"),
            _fmt(p["frac_outside_2"], ".3f"),
            _fmt(p["seq_kl"], ".1e"),
            _fmt(p["seq_slope_per_1k"], ".1e"),
        )
    return table


def diagnosis_table_view(components: list[dict]) -> Table:
    table = Table(title="Where the gap comes from: k3 between two scorings of the same tokens")
    for column in ("engine dtype", "component", "k3", "k3 95% CI", "mean|Δ log p|", "max|Δ log p|", "tokens"):
        table.add_column(column, justify="right", no_wrap=True)
    for c in components:
        ci = f"{_fmt(c['k3_ci_low'], '.1e')}–{_fmt(c['k3_ci_high'], '.1e')}"
        table.add_row(
            c["engine_dtype"],
            c["name"],
            _fmt(c["k3"]),
            ci,
            _fmt(c["mean_abs_dlogp"], ".1e"),
            _fmt(c["max_abs_dlogp"], ".1e"),
            str(c["n_tokens"]),
        )
    return table


def step_line(dtype: str, row: dict) -> str:
    skipped = " [red]skipped[/]" if row["skipped"] else ""
    return (
        f"{dtype} step {row['step']:>3}  reward {row['reward_mean']:.3f}  acc {row['accuracy']:.3f}  k3 {row['k3']:.2e}  "
        f"mean|Δp| {row['mean_abs_dp']:.2e}  ratio {row['min_ratio']:.3f}–{row['max_ratio']:.3f}  grad {row['grad_norm']:.3f}  "
        f"scale {row['loss_scale']:g}  entropy {row['entropy']:.2f}  len {row['response_len']:.0f}  {row['step_time']:.1f}s{skipped}"
    )
