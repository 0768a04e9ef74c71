"""report.html: one self-contained page (plots embedded as data URIs, no scripts, no fetches)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from mismatch.report import plots, values
from mismatch.report.compare import differences, side_by_side
from mismatch.report.content import (
    BUCKET_COLUMNS,
    DISTRIBUTION_COLUMNS,
    FLAGGED,
    GROWTH_COLUMNS,
    IMPACT_COLUMNS,
    IMPACT_CORRECTION_COLUMNS,
    STATUS_MARKS,
    analyze_facts,
    audit_rows,
    binding_corrections,
    bucket_rows,
    checks_line,
    distribution_view,
    growth_rows,
    header_facts,
    health_matrix,
    impact_correction_rows,
    impact_rows,
    worst_tokens,
)
from mismatch.report.frameworks import METRIC_NOTES, settings_for
from mismatch.runs import AnalyzeRun, ScanRun
from mismatch.stats.metrics import BOOTSTRAP_DRAWS

WORST_TOKENS = 25


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(["html", "j2"])
    )
    env.filters["sci"] = partial(values.number, spec=values.SCI)
    env.filters["fixed"] = partial(values.number, spec=values.FIXED)
    env.filters["integer"] = partial(values.number, spec="d")
    env.filters["ratio"] = values.ratio
    env.filters["percent"] = values.percent
    env.filters["tokens"] = partial(values.tokens_cell, parenthesised=True)
    env.globals["interval"] = values.interval
    env.globals["marks"] = STATUS_MARKS
    return env


def figures(run: ScanRun) -> dict[str, str]:
    drawn = {
        name: plots.to_data_uri(draw(run.tokens))
        for name, draw in (
            ("scatter", plots.scatter),
            ("sequence_drift", plots.sequence_drift),
            ("ratio_histogram", plots.ratio_histogram),
            ("position_profile", plots.position_profile),
        )
    }
    if isinstance(run, AnalyzeRun) and len(run.steps):
        drawn["over_training"] = plots.to_data_uri(plots.over_training(run.steps, run.summary["drift"]))
    if "entropy" in run.tokens and run.tokens["entropy"].notna().any():
        drawn["gap_by_entropy"] = plots.to_data_uri(plots.gap_by_entropy(run.tokens))
    return drawn


def distribution_context(distribution: dict | None) -> dict:
    """The template variables of distribution.html.j2 (scan and diagnose reports)."""
    lines, rows = distribution_view(distribution)
    return {"distribution_lines": lines, "distribution_rows": rows, "distribution_columns": DISTRIBUTION_COLUMNS}


def render_report(run: ScanRun) -> str:
    """report.html of a scan, or of an analyze run (a user's dump: no engine settings, maybe steps)."""
    recommendation = run.summary["recommendation"]
    config = run.summary["config"]
    analyzed = isinstance(run, AnalyzeRun)
    impact = run.summary.get("impact", {})
    health = run.summary.get("health", [])
    health_frameworks, health_rows = health_matrix(health)
    binding, idle = binding_corrections(run.summary.get("corrections", []))
    audit = audit_rows(run.summary.get("audit_by_pair", {}))
    return (
        environment()
        .get_template("report.html.j2")
        .render(
            title=f"mismatch · {'analyze · ' + ' · '.join(config['paths']) if analyzed else config['model']}",
            analyzed=analyzed,
            facts=analyze_facts(run) if isinstance(run, AnalyzeRun) else header_facts(run),
            health=health,
            health_line=checks_line([h["status"] for h in health]),
            health_frameworks=health_frameworks,
            health_rows=health_rows,
            audit=audit,
            audit_flagged=[a for a in audit if a["status"] in FLAGGED],
            audit_line=checks_line([a["status"] for a in audit]),
            corrections_binding=binding,
            corrections_idle=idle,
            drift=run.summary.get("drift", []),
            lora=run.summary.get("lora"),
            routing=run.summary.get("routing"),
            recommendation=recommendation,
            gate=run.summary.get("gate"),
            settings=settings_for(recommendation["verdict"]),
            pairs=run.pairs,
            probe=run.summary.get("semantic_probe"),
            probe_only=not analyzed
            and "fp32" not in config["dtypes"]
            and bool(run.summary.get("semantic_probe", {}).get("prompts")),
            metric_notes=METRIC_NOTES,
            n_boot=BOOTSTRAP_DRAWS,
            figures=figures(run),
            worst=worst_tokens(run, WORST_TOKENS),
            impact=impact,
            impact_folds=", ".join(sorted({str(r["folds"]) for r in impact.values()})),
            impact_columns=IMPACT_COLUMNS,
            impact_rows=impact_rows(impact),
            impact_correction_columns=IMPACT_CORRECTION_COLUMNS,
            impact_correction_rows=impact_correction_rows(impact),
            bucket_columns=BUCKET_COLUMNS,
            bucket_rows=bucket_rows(run.summary.get("buckets", [])),
            growth=[(g["pair"], g["sentence"]) for g in run.summary.get("growth", [])],
            growth_columns=GROWTH_COLUMNS,
            growth_rows=growth_rows([(g["pair"], g) for g in run.summary.get("growth", [])]),
            **distribution_context(run.summary.get("distribution")),
            run_path=run.path,
        )
    )


def render_compare(before: ScanRun, after: ScanRun) -> str:
    return (
        environment()
        .get_template("compare.html.j2")
        .render(
            title=f"mismatch · before / after · {before.summary['config']['model']}",
            before=before,
            after=after,
            differences=differences(before, after),
            rows=side_by_side(before, after),
            figures={
                "before": plots.to_data_uri(plots.scatter(before.tokens)),
                "after": plots.to_data_uri(plots.scatter(after.tokens)),
            },
        )
    )
