"""Everything measured on (μ, π) token rows, fed in chunks of whole sequences: the metrics per
pair, the correction replay, the health checks, the audit, the gap by bucket and (over steps, where
the rows carry the trainer's entropy) why it grows. A scan feeds its tokens frame once; `analyze`
feeds a dump step by step, so both compute their numbers with the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

import numpy as np
import pandas as pd

from mismatch.stats import health
from mismatch.stats.audit import Audit, AuditRow
from mismatch.stats.buckets import BucketSums, BucketTable
from mismatch.stats.corrections import CORRECTIONS, Correction, CorrectionRow, Replay
from mismatch.stats.growth import Growth, StepBuckets, growth_sentence
from mismatch.stats.health import CheckResult, HealthRow
from mismatch.stats.metrics import PairRow, PairStats, log_ratio

PAIR = ["engine_dtype", "trainer_dtype"]
STATUS_ORDER = {"not_measured": 0, "ok": 1, "warn": 2, "fail": 3}


def pair_name(engine_dtype: str, trainer_dtype: str) -> str:
    return f"{engine_dtype}→{trainer_dtype}"


StepRow = dict[str, object]  # step, the dtypes, PairMetrics, then `health:FRAMEWORK:METRIC` per check


class TokenInContext(TypedDict):
    """A sampled token with the response text around it and the end of its prompt; μ, π and π/μ."""

    seq_id: int
    position: int
    before: str
    token: str
    after: str
    mu: float
    pi: float
    ratio: float
    abs_log_ratio: float
    prompt: str


class _WorstTokenRequired(TokenInContext):
    pair: str


class WorstToken(_WorstTokenRequired, total=False):
    """A token with one of the largest |log π − log μ| (summary.json's `worst_tokens`): `pair`, then `step`
    where the rows have steps, then its `TokenInContext`."""

    step: int


class PairBuckets(TypedDict):
    """summary.json `buckets`: one pair's gap by bucket of the trainer's entropy (None when its rows
    carry no entropy) and by μ's probability of the sampled token."""

    pair: str
    engine_dtype: str
    trainer_dtype: str
    entropy: BucketTable | None
    engine_prob: BucketTable


class PairGrowth(Growth):
    """summary.json `growth`: one pair's growth of k3 over the steps (`stats.growth`)."""

    pair: str
    engine_dtype: str
    trainer_dtype: str
    sentence: str


class _Pair:
    def __init__(self, corrections: tuple[Correction, ...]):
        self.stats = PairStats()
        self.replay = Replay(corrections)
        self.audit = Audit()
        self.health: list[list[CheckResult]] = []  # one list of checks per chunk (step)
        self.entropy = BucketSums("entropy")
        self.engine_prob = BucketSums("engine_prob")
        self.with_entropy = False  # some rows carried the trainer's entropy
        self.growth = StepBuckets()


class Measures:
    """Per (engine dtype, trainer dtype) pair: streaming metrics, replay and audit, and the health
    checks and metrics of every chunk (a step of a training run)."""

    def __init__(self, corrections: tuple[Correction, ...] = CORRECTIONS, seed: int = 0):
        self.corrections = corrections
        self.seed = seed
        self.pairs: dict[tuple[str, str], _Pair] = {}
        self.steps: list[StepRow] = []

    def add(self, tokens: pd.DataFrame, step: int | None = None) -> None:
        """Token rows (TOKEN_COLUMNS; `cluster` overrides `prompt_index` as the resampled unit)."""
        for (engine_dtype, trainer_dtype), group in tokens.groupby(PAIR, sort=False):
            engine_dtype = str(engine_dtype)
            trainer_dtype = str(trainer_dtype)
            pair = self.pairs.setdefault((engine_dtype, trainer_dtype), _Pair(self.corrections))
            args = (group["logp_trainer"], group["logp_engine"], group["seq_id"])
            clusters = group["cluster"] if "cluster" in group else group["prompt_index"]
            full = group["logp_trainer_full"] if "logp_trainer_full" in group else None
            kept = group["log_kept_mass"] if "log_kept_mass" in group else None
            if step is None:
                pair.stats.add(*args, clusters, logp_trainer_full=full, log_kept_mass=kept)
            else:  # the step's own metrics, then the run's from the same sums
                step_stats = PairStats()
                step_stats.add(*args, clusters, logp_trainer_full=full, log_kept_mass=kept)
                pair.stats.merge(step_stats)
            pair.audit.add(*args)
            finite = np.isfinite(group["logp_trainer"].to_numpy()) & np.isfinite(group["logp_engine"].to_numpy())
            measured = group[finite]
            pair.replay.add(log_ratio(measured["logp_trainer"], measured["logp_engine"]), measured["seq_id"])
            checks = health.evaluate(group["logp_trainer"], group["logp_engine"], group["seq_id"])
            pair.health.append(checks)
            pair.engine_prob.add(group["logp_trainer"], group["logp_engine"], clusters=clusters)
            if "entropy" in group and group["entropy"].notna().any():
                pair.with_entropy = True
                pair.entropy.add(group["logp_trainer"], group["logp_engine"], group["entropy"], clusters)
                if step is not None:
                    pair.growth.add(
                        step, group["logp_trainer"], group["logp_engine"], group["entropy"], group["seq_id"]
                    )
            if step is not None:
                step_row: StepRow = {
                    "step": step,
                    "engine_dtype": engine_dtype,
                    "trainer_dtype": trainer_dtype,
                    **step_stats.result(self.seed),
                }
                for c in checks:
                    step_row[f"health:{c['framework']}:{c['metric']}"] = c["value"]
                self.steps.append(step_row)

    def pair_rows(self) -> list[PairRow]:
        return [
            {"engine_dtype": e, "trainer_dtype": t, **pair.stats.result(self.seed)}
            for (e, t), pair in self.pairs.items()
        ]

    def bucket_rows(self) -> list[PairBuckets]:
        return [
            {
                "pair": pair_name(e, t),
                "engine_dtype": e,
                "trainer_dtype": t,
                "entropy": pair.entropy.result(self.seed) if pair.with_entropy else None,
                "engine_prob": pair.engine_prob.result(self.seed),
            }
            for (e, t), pair in self.pairs.items()
        ]

    def growth_rows(self) -> list[PairGrowth]:
        """Per pair with the trainer's entropy over at least 2 steps: why its k3 grew (or fell)."""
        rows: list[PairGrowth] = []
        for (e, t), pair in self.pairs.items():
            found = pair.growth.growth(seed=self.seed)
            if found is not None:
                rows.append(
                    {
                        "pair": pair_name(e, t),
                        "engine_dtype": e,
                        "trainer_dtype": t,
                        **found,
                        "sentence": growth_sentence(found),
                    }
                )
        return rows

    def corrections_rows(self) -> list[CorrectionRow]:
        return [{"pair": pair_name(e, t), **row} for (e, t), pair in self.pairs.items() for row in pair.replay.result()]

    def health_rows(self) -> list[HealthRow]:
        """Per pair and check: the worst step's value and status, and how many steps failed."""
        rows: list[HealthRow] = []
        for (e, t), pair in self.pairs.items():
            for i, check in enumerate(pair.health[0]):
                per_step = [chunk[i] for chunk in pair.health]
                value = health.worst(check["metric"], [c["value"] for c in per_step])
                status = max((c["status"] for c in per_step), key=STATUS_ORDER.__getitem__)
                flagged = sum(c["status"] in ("warn", "fail") for c in per_step)
                rows.append(
                    {
                        **check,
                        "pair": pair_name(e, t),
                        "value": value,
                        "status": status,
                        "steps": len(per_step),
                        "steps_flagged": flagged,
                    }
                )
        return rows

    def audit_rows(self, temperature: float | None) -> tuple[list[AuditRow], dict[str, list[AuditRow]]]:
        """Each check's worst result over the pairs (with its pair), and every pair's."""
        by_pair: dict[str, list[AuditRow]] = {
            pair_name(e, t): [{**row, "pair": pair_name(e, t)} for row in pair.audit.result(temperature)]
            for (e, t), pair in self.pairs.items()
        }
        worst: dict[str, AuditRow] = {}
        for rows in by_pair.values():
            for row in rows:
                if (
                    row["check"] not in worst
                    or STATUS_ORDER[row["status"]] > STATUS_ORDER[worst[row["check"]]["status"]]
                ):
                    worst[row["check"]] = row
        return list(worst.values()), by_pair


def worst_tokens(
    tokens: pd.DataFrame,
    prompt_of: Callable[[str, int], str],
    n: int = 20,
    *,
    left: int = 12,
    right: int = 6,
    prompt_chars: int = 160,
) -> list[WorstToken]:
    """The `n` tokens with the largest |log π − log μ|, each with the response text around it and
    the end of its prompt (`prompt_of(engine_dtype, seq_id)`); `step` too where the rows have one."""
    scored = tokens.assign(ratio=log_ratio(tokens["logp_trainer"], tokens["logp_engine"]))
    scored = scored[np.isfinite(scored["ratio"])]
    top = scored.reindex(scored["ratio"].abs().sort_values(ascending=False).index[:n])
    keys = ["step", "engine_dtype", "seq_id"] if "step" in tokens else ["engine_dtype", "seq_id"]
    wanted = top[keys].drop_duplicates()
    sequences = tokens.merge(wanted, on=keys).drop_duplicates([*keys, "position"]).sort_values("position")
    text = {
        key: dict(zip(rows["position"], rows["token"], strict=True))
        for key, rows in sequences.groupby(keys, sort=False)
    }
    found: list[WorstToken] = []
    for row in top.itertuples():
        key = tuple(getattr(row, k) for k in keys)
        response = text[key]
        context: TokenInContext = {
            "seq_id": int(row.seq_id),
            "position": int(row.position),
            "before": "".join(response.get(p, "") for p in range(max(0, row.position - left), row.position)),
            "token": row.token,
            "after": "".join(response.get(p, "") for p in range(row.position + 1, row.position + 1 + right)),
            "mu": float(np.exp(row.logp_engine)),
            "pi": float(np.exp(row.logp_trainer)),
            "ratio": float(np.exp(row.ratio)),
            "abs_log_ratio": float(abs(row.ratio)),
            "prompt": prompt_of(row.engine_dtype, row.seq_id)[-prompt_chars:],
        }
        name = pair_name(row.engine_dtype, row.trainer_dtype)
        found.append(
            {"pair": name, "step": int(row.step), **context} if "step" in tokens else {"pair": name, **context}
        )
    return found
