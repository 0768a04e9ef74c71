"""summary.md: verdict, table and worst tokens as Markdown a PR comment can hold as is."""

from __future__ import annotations

import math

from mismatch.report.compare import differences, side_by_side
from mismatch.report.content import analyze_facts, header_facts, worst_tokens
from mismatch.runs import AnalyzeRun, ScanRun

LIMIT = 60_000  # GitHub's comment body limit is 65,536 characters
CELL = 160  # characters of context per worst-token cell


def number(value, spec: str = ".2e") -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


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


def _render(run: ScanRun, worst: list[dict]) -> str:
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
        "| engine → trainer | tokens | k3 [95% CI] | k1 | mean \\|Δp\\| [95% CI] | max \\|Δp\\| | min / max ratio | frac outside ×2 | seq KL | slope / 1k | Δ log ppl |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in run.pairs:
        tokens = (
            f"{p['n_tokens']}"
            + (f" (+{p['n_nonfinite']} non-finite)" if p["n_nonfinite"] else "")
            + (f" (+{p['n_outside_nucleus']} outside nucleus)" if p["n_outside_nucleus"] else "")
        )
        lines.append(
            f"| {p['engine_dtype']} → {p['trainer_dtype']} | {tokens} | {number(p['k3'])} [{number(p['k3_ci_low'])}, {number(p['k3_ci_high'])}] "
            f"| {number(p['k1'])} | {number(p['mean_abs_dp'])} [{number(p['mean_abs_dp_ci_low'])}, {number(p['mean_abs_dp_ci_high'])}] "
            f"| {number(p['max_abs_dp'], '.4f')} | {number(p['min_ratio'], '.4f')} / {number(p['max_ratio'], '.4f')} | {number(p['frac_outside_2'], '.4f')} "
            f"| {number(p['seq_kl'])} | {number(p['seq_slope_per_1k'])} | {number(p['log_ppl_diff'])} |"
        )
    lines += [
        "",
        "ℓ = log π(trainer) − log μ(engine) over sampled response tokens; k3 = mean(e^ℓ − 1 − ℓ) estimates KL[μ‖π].",
        "",
    ]
    lines += [
        " · ".join(
            f"{name}: {escape(value)}"
            for name, value in (analyze_facts(run) if analyzed else header_facts(run))
            if name != "tokens"
        ),
        "",
    ]
    lines += _checks(run.summary)
    if worst:
        step = "step" in worst[0]  # an analyzed run numbers sequences per step
        lines += [
            "<details><summary>Worst tokens in context</summary>",
            "",
            f"| pair |{' step |' if step else ''} seq | pos | context (token in **bold**) | μ | π | π/μ |",
            f"|---|{'--:|' if step else ''}--:|--:|---|--:|--:|--:|",
        ]
        for w in worst:
            context = f"{escape(w['before'][-CELL:])}**{escape(w['token'])}**{escape(w['after'][:CELL])}"
            step_cell = f" {w['step']} |" if step else ""
            lines.append(
                f"| {escape(w['pair'])} |{step_cell} {w['seq_id']} | {w['position']} | {context} | {w['mu']:.4f} | {w['pi']:.4f} | {w['ratio']:.4f} |"
            )
        lines += ["", "</details>", ""]
    lines.append(
        f"<sub>mismatch {escape(str(run.summary.get('versions', {}).get('mismatch')))} · every number is recomputable from the run's tokens.parquet</sub>"
    )
    return "\n".join(lines) + "\n"


def _checks(summary: dict) -> list[str]:
    """The audit, the health checks that are not ok, the correction replay and the drift."""
    lines = []
    if audit := summary.get("audit"):
        lines += ["**Setup audit:** " + " · ".join(f"{a['check']} {a['status']}" for a in audit), ""]
        lines += [
            f"- {a['check']} ({escape(a['pair'])}): {escape(a['detail'])}"
            for a in audit
            if a["status"] in ("warn", "fail")
        ]
        lines += [""] if lines[-1] else []
    health = summary.get("health", [])
    if flagged := [h for h in health if h["status"] in ("warn", "fail")]:
        lines += [
            f"**Health:** {len(flagged)} of {len(health)} framework checks flagged",
            "",
            "| pair | framework | metric | value | healthy | status |",
            "|---|---|---|--:|---|---|",
        ]
        lines += [
            f"| {escape(h['pair'])} | {h['framework']} | {escape(h['metric'])} | {number(h['value'], '.3g')} | {escape(h['threshold'])} | {h['status']} |"
            for h in flagged
        ]
        lines.append("")
    elif health:
        lines += [f"**Health:** all {len(health)} framework checks pass", ""]
    if lora := summary.get("lora"):
        lines += [
            f"**LoRA adapter** (rank {lora['adapter']['rank']}), applied by each side (vLLM LoRA request, PEFT) against merged into the base:",
            "",
            "| engine → trainer | k3 applied [95% CI] | k3 merged [95% CI] | applied / merged | adapter path |",
            "|---|--:|--:|--:|---|",
        ]
        lines += [
            f"| {c['engine_dtype']} → {c['trainer_dtype']} | {number(c['k3_lora'])} [{number(c['k3_ci_low_lora'])}, {number(c['k3_ci_high_lora'])}] | {number(c['k3_merged'])} [{number(c['k3_ci_low_merged'])}, {number(c['k3_ci_high_merged'])}] | {number(c['k3_ratio'], '.3g')}× | {c['adapter_path'].replace('_', ' ')} |"
            for c in lora["comparison"]
        ]
        lines.append("")
    lines += routing_lines(summary.get("routing"))
    if corrections := summary.get("corrections"):
        lines += [
            "<details><summary>What each correction would do</summary>",
            "",
            "| pair | correction | band | tokens changed | sequences changed | ESS before → after |",
            "|---|---|---|--:|--:|--:|",
        ]
        lines += [
            f"| {escape(c['pair'])} | {escape(c['correction'])} ({c['level']} {c['action']}) | {c['band']} | {100 * c['share_tokens_changed']:.3g}% | {100 * c['share_seqs_changed']:.3g}% | {c['ess_before']:.3f} → {c['ess_after']:.3f} |"
            for c in corrections
        ]
        lines += ["", "</details>", ""]
    if departed := [d for d in summary.get("drift", []) if d["departs_at"] is not None]:
        lines += [
            "**Over training:** "
            + " · ".join(
                f"{escape(d['pair'])} {escape(d['metric'])} departs from its start at step {d['departs_at']}"
                for d in departed
            ),
            "",
        ]
    return lines


def routing_lines(routing: dict | None) -> list[str]:
    """An MoE run's routing agreement: per pair, the tokens routed differently and their share of the gap."""
    if not routing:
        return []
    lines = [
        "**MoE routing** (engine against trainer, top-k experts at each response token's scoring position):",
        "",
        "| engine → trainer | routed differently | share of Σℓ² | mean \\|ℓ\\| differing / same | same experts per layer |",
        "|---|--:|--:|--:|---|",
    ]
    for g in routing["gap"]:
        layers = ", ".join(
            f"{r['layer']}: {100 * r['share']:.3g}%"
            for r in routing["by_layer"]
            if (r["engine_dtype"], r["trainer_dtype"]) == (g["engine_dtype"], g["trainer_dtype"])
        )
        lines.append(
            f"| {g['engine_dtype']} → {g['trainer_dtype']} | {g['differs']} of {g['tokens']} | {number(g['share_sq'], '.3g')} | {number(g['mean_abs_differs'], '.3g')} / {number(g['mean_abs_same'], '.3g')} | {layers} |"
        )
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
        lines += (
            ["| setting | before | after |", "|---|---|---|"]
            + [f"| {escape(n)} | {escape(a)} | {escape(b)} |" for n, a, b in diffs]
            + [""]
        )
    lines += ["| engine → trainer | metric | before | after | after / before |", "|---|---|--:|--:|--:|"]
    for row in side_by_side(before, after):
        ratio = "—" if row["ratio"] is None else f"{row['ratio']:.3g}×"
        lines.append(
            f"| {row['pair']} | {row['metric']} | {number(row['before'])} | {number(row['after'])} | {ratio} |"
        )
    return "\n".join(lines) + "\n"
