"""`mismatch analyze` as a library call: a user's training dump → π (the dump's own, or ours
rescored with `--model` per dtype) → metrics per pair and per step, correction replay, health,
audit → a run folder with a scan's files and report.

The dump is read once per trainer side, one chunk (step) at a time: memory holds a step, the
running sums of `Measures` and the worst tokens, never the whole run (a dump without steps is one
chunk, read whole).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mismatch import runs
from mismatch.commands.progress import Progress, Silent
from mismatch.config import AnalyzeConfig
from mismatch.dumps import Chunk, find_reader
from mismatch.errors import DumpError, RunFolderError
from mismatch.records import Rollout
from mismatch.report import write_report
from mismatch.stats.corrections import with_thresholds
from mismatch.stats.drift import DRIFT_METRICS, drift
from mismatch.stats.measures import Measures, pair_name, worst_tokens
from mismatch.verdict.recommend import recommend_run

ENGINE, TRAINER = "engine", "trainer"  # pair names where the dump does not give its dtypes
WORST = 25
ASSUMED_TEMPERATURE = "not recorded in the dump: 1 assumed (give --temperature)"


class _Rescorer:
    """The user's model as trainer, in each requested dtype, over the dump's token ids."""

    def __init__(self, config: AnalyzeConfig):
        from mismatch.model.loading import load_tokenizer, resolve_model

        self.config = config
        self.path = resolve_model(config.model, trust_remote_code=config.trust_remote_code)
        self.tokenizer = load_tokenizer(self.path, trust_remote_code=config.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.model = None

    def load(self, dtype: str) -> None:
        from mismatch.model.rescore import load_trainer

        self.model = None  # free the previous dtype's weights first
        self.dtype, self.model = dtype, load_trainer(self.path, dtype, trust_remote_code=self.config.trust_remote_code)

    def score(self, chunk: Chunk, temperature: float) -> pd.DataFrame:
        """The chunk's rows with `logp_trainer` (and the nucleus columns) from our forward."""
        from mismatch.model.rescore import rescore

        tokens = chunk.tokens
        seqs = list(dict.fromkeys(tokens["seq_id"]))
        missing = [s for s in seqs if s not in chunk.contexts]
        if missing:
            raise DumpError(
                f"sequence {missing[0]} has no prompt token ids, so --model cannot rescore it: add a prompt_ids field (a list per sequence)"
            )
        rollouts = [Rollout(0, 0, *chunk.contexts[s], [], "") for s in seqs]
        scores = rescore(self.model, self.dtype, rollouts, temperature, self.config.top_p, self.pad_id)
        starts = dict(zip(seqs, np.cumsum([0] + [len(r.response_ids) for r in rollouts[:-1]])))
        at = tokens["seq_id"].map(starts).to_numpy() + tokens["position"].to_numpy()
        if (
            tokens["position"].to_numpy()
            >= tokens["seq_id"].map({s: len(r.response_ids) for s, r in zip(seqs, rollouts)}).to_numpy()
        ).any():
            raise DumpError("a token row's position is beyond its sequence's response ids")
        wrong = np.concatenate([r.response_ids for r in rollouts])[at] != tokens["token_id"].to_numpy()
        if wrong.any():  # π would be scored for another token than the one μ is of
            raise DumpError(
                f"sequence {tokens['seq_id'].to_numpy()[wrong][0]}: token_id differs from its response ids at position {tokens['position'].to_numpy()[wrong][0]} (positions count from 0 at the first response token)"
            )
        return tokens.assign(
            **{name: np.concatenate(values)[at] for name, values in scores.items()}, trainer_dtype=self.dtype
        )


def run_analyze(config: AnalyzeConfig, progress: Progress | None = None, force: bool = False) -> dict:
    """Analyze the dump in `config.paths` into `config.out`; return its summary (also summary.json)."""
    progress = progress or Silent()
    runs.check_output_dir(config.out, force)
    reader = find_reader(config.paths, config.format)
    log = runs.RunLog(config.out, "analyze", config.to_json())
    summary, stage = log.summary, log.stage
    summary["format"] = reader.NAME
    summary["seed"] = config.seed if config.seed is not None else _scan_seed(config.paths)
    measures = Measures(with_thresholds(config.corrections), summary["seed"])
    worst: list[dict] = []
    steps: set[int] = set()
    temperature = config.temperature
    summary["temperature_source"] = "--temperature"
    rescorer = None
    if config.model:
        with stage("load_tokenizer"):
            rescorer = _Rescorer(config)
    with runs.parquet_sink(config.out / runs.TOKENS, runs.ANALYZE_TOKEN_COLUMNS) as write:
        for trainer in [None, *(config.dtypes if rescorer else [])]:
            with stage(f"read_{trainer or 'dump'}"):
                if trainer:
                    rescorer.load(trainer)
                advance = progress.stage(f"{reader.NAME}: " + (f"rescore in {trainer}" if trainer else "read"), None)
                for chunk in reader.read(config.paths):
                    if temperature is None:
                        temperature, summary["temperature_source"] = _dump_temperature(chunk)
                    if (
                        "dump_has_trainer" not in summary
                    ):  # decided on the first step; a later step's missing π counts as non-finite
                        summary["dump_has_trainer"] = _has_trainer(chunk)
                    if trainer is None and not summary["dump_has_trainer"]:
                        if rescorer is None:
                            raise DumpError(
                                f"{config.paths[0]} carries only μ (no logp_trainer): pass --model (and --temperature, --top-p as sampled) to compute π"
                            )
                        break
                    tokens = _rows(rescorer.score(chunk, temperature) if trainer else chunk.tokens, rescorer)
                    write(tokens)
                    has_steps = "step" in chunk.tokens
                    if has_steps:
                        steps.update(tokens["step"].unique().tolist())
                    measures.add(
                        tokens.assign(cluster=_clusters(tokens, has_steps)),
                        int(tokens["step"].iat[0]) if has_steps else None,
                    )
                    worst = _worst(worst, tokens, chunk, rescorer)
                    advance(1)
    if not measures.pairs:
        raise DumpError(f"{', '.join(map(str, config.paths))} holds no token with a loss mask: nothing to analyze")

    with stage("metrics"):
        pairs = measures.pair_rows()
        runs.write_csv(config.out / runs.METRICS_CSV, pd.DataFrame(pairs))
        step_frame = pd.DataFrame(measures.steps)
        if len(steps) > 1:
            runs.write_parquet(config.out / runs.STEPS, step_frame)
        audit, audit_by_pair = measures.audit_rows(
            None if summary["temperature_source"] == ASSUMED_TEMPERATURE else temperature
        )
        health = measures.health_rows()
        summary |= {
            "temperature": temperature,
            "n_steps": len(steps),
            "pairs": pairs,
            "corrections": measures.corrections_rows(),
            "health": health,
            "audit": audit,
            "audit_by_pair": audit_by_pair,
            "drift": _drift(step_frame) if len(steps) > 1 else [],
            "worst_tokens": worst,
        }
        summary["recommendation"] = recommend_run(pairs, health, audit, summary["drift"], summary["corrections"])
    log.finish()
    with stage("report"):
        write_report(config.out)
    return summary


def _scan_seed(paths) -> int:
    """The seed of the scan whose tokens are analysed (so its intervals come out the same), else 0."""
    folder = paths[0] if paths[0].is_dir() else paths[0].parent
    if len(paths) == 1 and (folder / runs.SUMMARY).is_file():
        try:
            return int(runs.read_summary(folder, ("scan",))["config"]["sampling"]["seed"])
        except RunFolderError:
            pass
    return 0


def _has_trainer(chunk: Chunk) -> bool:
    """Whether the dump carries π (a `logp_trainer` column that is not all null)."""
    return "logp_trainer" in chunk.tokens and bool(chunk.tokens["logp_trainer"].notna().any())


def _dump_temperature(chunk: Chunk) -> tuple[float, str]:
    """The sampling temperature the dump records, else 1 (what rescoring then applies)."""
    if "temperature" in chunk.tokens and chunk.tokens["temperature"].notna().any():
        return float(chunk.tokens["temperature"].dropna().iat[0]), "the dump"
    return 1.0, ASSUMED_TEMPERATURE


def _rows(tokens: pd.DataFrame, rescorer) -> pd.DataFrame:
    """Open-format rows completed to ANALYZE_TOKEN_COLUMNS (defaults where the dump is silent)."""
    tokens = tokens.copy()
    defaults = {"step": 0, "engine_dtype": ENGINE, "trainer_dtype": TRAINER, "finish_reason": None}
    for column, value in defaults.items():
        if column not in tokens:
            tokens[column] = value
    if "prompt_index" not in tokens:
        tokens["prompt_index"] = tokens["seq_id"]  # no groups: each sequence its own unit
    if "logp_trainer_full" not in tokens:
        tokens["logp_trainer_full"] = tokens["logp_trainer"]
    if "log_kept_mass" not in tokens:
        tokens["log_kept_mass"] = 0.0
    if "response_len" not in tokens:
        tokens["response_len"] = tokens.groupby(["step", "seq_id"])["position"].transform("max") + 1
    if "token" not in tokens:
        tokens = (
            runs.with_token_text(tokens, rescorer.tokenizer)
            if rescorer
            else tokens.assign(token=tokens["token_id"].map(lambda i: f"⟨{i}⟩"))
        )
    return tokens[list(runs.ANALYZE_TOKEN_COLUMNS)]


def _clusters(tokens: pd.DataFrame, has_steps: bool) -> pd.Series:
    """The resampled unit: the prompt, within its step (prompt numbers restart every step)."""
    if not has_steps:
        return tokens["prompt_index"]
    keys = (
        pd.util.hash_pandas_object(tokens[["step", "prompt_index"]], index=False).to_numpy().view(np.int64)
    )  # one int per (step, prompt)
    return pd.Series(keys, index=tokens.index)


def _worst(kept: list[dict], tokens: pd.DataFrame, chunk: Chunk, rescorer) -> list[dict]:
    def prompt_of(engine_dtype, seq_id) -> str:
        context = chunk.contexts.get(int(seq_id))
        return rescorer.tokenizer.decode(context[0]) if rescorer and context else ""

    found = worst_tokens(tokens, prompt_of, WORST)
    return sorted(kept + found, key=lambda row: row["abs_log_ratio"], reverse=True)[:WORST]


def _drift(step_frame: pd.DataFrame) -> list[dict]:
    return [
        {"pair": pair_name(engine, trainer)} | drift(group["step"], group[metric], metric)
        for (engine, trainer), group in step_frame.sort_values("step").groupby(
            ["engine_dtype", "trainer_dtype"], sort=False
        )
        for metric in DRIFT_METRICS
    ]
