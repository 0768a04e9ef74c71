"""summary.md: verdict, table and worst tokens as Markdown a PR comment can hold as is."""

from __future__ import annotations

from typing import Any

from mismatch.report.compare import differences, side_by_side
from mismatch.report.content import (
    DISTRIBUTION_COLUMNS,
    FLAGGED,
    IMPACT_COLUMNS,
    STATUS_MARKS,
    analyze_facts,
    audit_rows,
    binding_corrections,
    checks_line,
    distribution_view,
    header_facts,
    health_matrix,
    impact_rows,
    pair_rows,
    worst_tokens,
)
from mismatch.report.frameworks import settings_for
from mismatch.report.values import FIXED, interval, number, percent, ratio, tokens_cell
from mismatch.runs import AnalyzeRun, ScanRun
from mismatch.stats.corrections import CorrectionRow
from mismatch.stats.health import HealthRow
from mismatch.stats.measures import WorstToken

LIMIT = 60_000  # GitHub's comment body limit is 65,536 characters
CELL = 160  # characters of context per worst-token cell


CONTROL_PICTURES = {code: 0x2400 + code for code in range(0x20)} | {0x7F: 0x2421}  # NUL → ␀ … ESC → ␛, DEL → ␡


def escape(text: str) -> str:
    """Generated text inside a table cell: no HTML, no Markdown syntax, no line breaks, no control
    characters (a sampled byte token can be NUL or ESC: shown as its control picture)."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for char in "\\`*_[]|#~":
        text = text.replace(char, "\\" + char)
    return text.replace("\r", "").replace("\n", "⏎").translate(CONTROL_PICTURES)


def render_markdown(run: ScanRun, worst: int = 25) -> str:
    """The summary; worst-token rows are dropped from the end until it fits under LIMIT."""
    rows = worst_tokens(run, worst)
    while True:
        text = _render(run, rows)
        if len(text) <= LIMIT or not rows:
            return text
        rows = rows[: len(rows) // 2]


def row(cells: list[str]) -> str:
    """One row of a Markdown table."""
    return "| " + " | ".join(cells) + " |"


def _render(run: ScanRun, worst: list[WorstToken]) -> str:
    recommendation = run.summary["recommendation"]
    analyzed = isinstance(run, AnalyzeRun)
    title = "analyze " + " · ".join(run.summary["config"]["paths"]) if analyzed else run.summary["config"]["model"]
    lines = [f"## mismatch: {escape(title)}", "", f"**Verdict:** {escape(recommendation['summary'])}", ""]
    lines += [f"- {action}" for action in recommendation["actions"]]
    if gate := run.summary.get("gate"):
        lines += ["", f"**CI gate:** {'failed: ' + '; '.join(gate['failed']) if gate['failed'] else 'passed'}"]
        lines += [f"- not measured: {escape(text)}" for text in gate.get("not_measured", [])]
    lines += [
        "",
        "| engine → trainer | tokens | k3 [95% CI] | k1 | mean \\|Δp\\| [95% CI] | max \\|Δp\\| | min / max ratio "
        "| frac outside ×2 | seq KL | slope / 1k | Δ log ppl |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in pair_rows(run):
        cells = [
            f"{p['engine_dtype']} → {p['trainer_dtype']}",
            tokens_cell(p, parenthesised=True),
            f"{number(p['k3'])} {interval(p['k3_ci_low'], p['k3_ci_high'])}",
            number(p["k1"]),
            f"{number(p['mean_abs_dp'])} {interval(p['mean_abs_dp_ci_low'], p['mean_abs_dp_ci_high'])}",
            number(p["max_abs_dp"], FIXED),
            f"{number(p['min_ratio'], FIXED)} / {number(p['max_ratio'], FIXED)}",
            number(p["frac_outside_2"], FIXED),
            number(p["seq_kl"]),
            number(p["seq_slope_per_1k"]),
            number(p["log_ppl_diff"]),
        ]
        lines.append(row(cells))
    lines += [
        "",
        "ℓ = log π(trainer) − log μ(engine) over sampled response tokens; k3 = mean(e^ℓ − 1 − ℓ) estimates KL[μ‖π].",
        "",
    ]
    lines += _checks(run.summary)
    lines += _settings_lines(settings_for(recommendation["verdict"]))
    lines += _analyses(run.summary)
    facts = analyze_facts(run) if isinstance(run, AnalyzeRun) else header_facts(run)
    lines += [" · ".join(f"{name}: {escape(value)}" for name, value in facts if name != "tokens"), ""]
    if worst:
        lines += _worst_lines(worst)
    version = escape(str(run.summary.get("versions", {}).get("mismatch")))
    lines.append(f"<sub>mismatch {version} · every number is recomputable from the run's tokens.parquet</sub>")
    return "\n".join(lines) + "\n"


def _impact_lines(impact: dict[str, Any]) -> list[str]:
    """The gradient impact table: bias against one step's noise, B*, per engine dtype."""
    lines = [
        "**Does the gap matter for training?** The GRPO gradient's bias from the mismatch against one step's noise:",
        "",
    ]
    lines += [row(list(IMPACT_COLUMNS)), "|---|" + "--:|" * (len(IMPACT_COLUMNS) - 2) + "---|"]
    lines += [row([escape(cell) for cell in cells]) for cells in impact_rows(impact)]
    return [*lines, ""]


def _worst_lines(worst: list[WorstToken]) -> list[str]:
    step = "step" in worst[0]  # an analyzed run numbers sequences per step
    lines = [
        "<details><summary>Worst tokens in context</summary>",
        "",
        f"| pair |{' step |' if step else ''} seq | pos | context (token in **bold**) | μ | π | π/μ |",
        f"|---|{'--:|' if step else ''}--:|--:|---|--:|--:|--:|",
    ]
    for w in worst:
        context = f"{escape(w['before'][-CELL:])}**{escape(w['token'])}**{escape(w['after'][:CELL])}"
        step_cell = f" {w['step']} |" if step else ""
        lines.append(
            f"| {escape(w['pair'])} |{step_cell} {w['seq_id']} | {w['position']} | {context} "
            f"| {number(w['mu'], FIXED)} | {number(w['pi'], FIXED)} | {number(w['ratio'], FIXED)} |"
        )
    return [*lines, "", "</details>", ""]


def _checks(summary: dict[str, Any]) -> list[str]:
    """The health checks, what binds among the corrections, and the setup audit where it flags."""
    lines = _health_lines(summary.get("health", []))
    lines += _correction_lines(summary.get("corrections", []))
    if audit := audit_rows(summary.get("audit_by_pair", {})):
        lines += [f"**Setup audit:** {checks_line([a['status'] for a in audit])}", ""]
        if flagged := [a for a in audit if a["status"] in FLAGGED]:
            lines += [f"- {a['check']} ({escape(a['pair'])}) {a['status']}: {escape(a['detail'])}" for a in flagged]
            lines += [""]
    return lines


def _correction_lines(corrections: list[CorrectionRow]) -> list[str]:
    """The corrections that change something on these tokens in a table, the others collapsed."""
    if not corrections:
        return []
    binding, idle = binding_corrections(corrections)
    head = [
        "| pair | correction | band | tokens changed | sequences changed | ESS before → after |",
        "|---|---|---|--:|--:|--:|",
    ]

    def table(rows: list[CorrectionRow]) -> list[str]:
        return head + [
            row(
                [
                    escape(c["pair"]),
                    f"{escape(c['correction'])} ({c['level']} {c['action']})",
                    c["band"],
                    percent(c["share_tokens_changed"]),
                    percent(c["share_seqs_changed"]),
                    f"{number(c['ess_before'], '.3f')} → {number(c['ess_after'], '.3f')}",
                ]
            )
            for c in rows
        ]

    if binding:
        lines = [f"**Corrections that change something here** ({len(binding)} of {len(corrections)}):", ""]
        lines += [*table(binding), ""]
    else:
        lines = [f"**Corrections:** none of the {len(corrections)} replayed changes a token or a sequence here", ""]
    if idle:
        more = "more " if binding else ""
        lines += [
            f"<details><summary>{len(idle)} {more}(pair, correction) rows that change nothing here</summary>",
            "",
            *table(idle),
            "",
        ]
        lines += ["</details>", ""]
    return lines


def _settings_lines(settings: list[dict[str, str]]) -> list[str]:
    """The ready-to-paste settings for the verdict: the first shown, the others collapsed."""
    if not settings:
        return []
    lines = ["**What to change, ready to paste:**", ""]
    for i, framework in enumerate(settings):
        lines += [f"<details{' open' if i == 0 else ''}><summary>{framework['name']}</summary>", ""]
        lines += ["```", framework["snippet"], "```", ""]
        if framework.get("note"):
            lines += [escape(framework["note"]), ""]
        lines += ["</details>", ""]
    return lines


def _analyses(summary: dict[str, Any]) -> list[str]:
    """After the checks: the gradient impact, the LoRA and routing tables, the whole distribution, the drift and
    why the gap grew."""
    lines = _impact_lines(impact) if (impact := summary.get("impact")) else []
    if lora := summary.get("lora"):
        lines += _lora_lines(lora)
    lines += routing_lines(summary.get("routing"))
    lines += distribution_lines(summary.get("distribution"))
    if departed := [d for d in summary.get("drift", []) if d["departs_at"] is not None]:
        lines += [
            "**Over training:** "
            + " · ".join(
                f"{escape(d['pair'])} {escape(d['metric'])} departs from its start at step {d['departs_at']}"
                for d in departed
            ),
            "",
        ]
    if growth := summary.get("growth"):
        lines += ["**Why the gap grew:** " + " · ".join(f"{escape(g['pair'])}: {g['sentence']}" for g in growth), ""]
    return lines


def _health_lines(health: list[HealthRow]) -> list[str]:
    """The framework health checks: that all pass; or the matrix (pair × framework, the worst of its checks)
    and a table of those flagged, collapsed."""
    if flagged := [h for h in health if h["status"] in FLAGGED]:
        frameworks, matrix = health_matrix(health)
        lines = [
            f"**Health:** {len(flagged)} of {len(health)} framework checks flagged",
            "",
            row(["engine → trainer", *frameworks]),
            "|---|" + "---|" * len(frameworks),
            *[row([escape(pair), *[STATUS_MARKS[c["status"]] if c else "–" for c in cells]]) for pair, cells in matrix],
            "",
            "<details><summary>The checks flagged</summary>",
            "",
            "| pair | framework | metric | value | healthy | status | source |",
            "|---|---|---|--:|---|---|---|",
        ]
        lines += [
            row(
                [
                    escape(h["pair"]),
                    h["framework"],
                    escape(h["metric"]),
                    number(h["value"], ".3g"),
                    escape(h["threshold"]),
                    h["status"],
                    escape(", ".join(filter(None, (h.get("version"), h["source"])))),
                ]
            )
            for h in flagged
        ]
        return [*lines, "", "</details>", ""]
    if health:
        return [f"**Health:** all {len(health)} framework checks pass", ""]
    return []


def _lora_lines(lora: dict[str, Any]) -> list[str]:
    """A LoRA scan: the adapter applied by each side against merged into the base, per pair."""
    lines = [
        f"**LoRA adapter** (rank {lora['adapter']['rank']}), applied by each side (vLLM LoRA request, PEFT) "
        "against merged into the base:",
        "",
        "| engine → trainer | k3 applied [95% CI] | k3 merged [95% CI] | applied / merged | adapter path |",
        "|---|--:|--:|--:|---|",
    ]
    lines += [
        row(
            [
                f"{c['engine_dtype']} → {c['trainer_dtype']}",
                f"{number(c['k3_lora'])} {interval(c['k3_ci_low_lora'], c['k3_ci_high_lora'])}",
                f"{number(c['k3_merged'])} {interval(c['k3_ci_low_merged'], c['k3_ci_high_merged'])}",
                f"{number(c['k3_ratio'], '.3g')}×",
                c["adapter_path"].replace("_", " "),
            ]
        )
        for c in lora["comparison"]
    ]
    return [*lines, ""]


def distribution_lines(distribution: dict[str, Any] | None) -> list[str]:
    """The full-distribution view: per pair, exact KLs and TV at the recorded positions and whether the
    sampled-token k3 agrees with the exact KL; per engine dtype without rows, why."""
    lines, rows = distribution_view(distribution)
    if not lines:
        return []
    out = ["**The whole distribution at sampled positions:**", "", *[f"- {escape(line)}" for line in lines], ""]
    if rows:
        out += [row(list(DISTRIBUTION_COLUMNS)), "|---|--:|--:|--:|--:|--:|", *[row(r) for r in rows], ""]
    return out


def routing_lines(routing: dict[str, Any] | None) -> list[str]:
    """An MoE run's routing agreement: per pair, the tokens routed differently and their share of the gap."""
    if not routing:
        return []
    lines = [
        "**MoE routing** (engine against trainer, top-k experts at each response token's scoring position):",
        "",
        "| engine → trainer | routed differently | share of Σℓ² | mean \\|ℓ\\| differing / same "
        "| same experts per layer |",
        "|---|--:|--:|--:|---|",
    ]
    for g in routing["gap"]:
        layers = ", ".join(
            f"{r['layer']}: {percent(r['share'])}"
            for r in routing["by_layer"]
            if (r["engine_dtype"], r["trainer_dtype"]) == (g["engine_dtype"], g["trainer_dtype"])
        )
        cells = [
            f"{g['engine_dtype']} → {g['trainer_dtype']}",
            f"{g['differs']} of {g['tokens']}",
            number(g["share_sq"], ".3g"),
            f"{number(g['mean_abs_differs'], '.3g')} / {number(g['mean_abs_same'], '.3g')}",
            layers,
        ]
        lines.append(row(cells))
    return [*lines, ""]


def render_compare_markdown(before: ScanRun, after: ScanRun) -> str:
    lines = [
        "## mismatch: before / after",
        "",
        f"**Before:** {before.summary['recommendation']['summary']}",
        "",
        f"**After:** {after.summary['recommendation']['summary']}",
        "",
    ]
    if diffs := differences(before, after):
        lines += ["| setting | before | after |", "|---|---|---|"]
        lines += [row([escape(n), escape(a), escape(b)]) for n, a, b in diffs]
        lines += [""]
    lines += ["| engine → trainer | metric | before | after | after / before |", "|---|---|--:|--:|--:|"]
    lines += [
        row([r["pair"], r["metric"], number(r["before"]), number(r["after"]), ratio(r["ratio"])])
        for r in side_by_side(before, after)
    ]
    return "\n".join(lines) + "\n"
