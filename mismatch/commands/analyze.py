"""`mismatch analyze` as a library call: a user's training dump → π (the dump's own, or ours
rescored with `--model` per dtype) → metrics per pair and per step, correction replay, health,
audit → a run folder with a scan's files and report.

The dump is read once per trainer side, one chunk (step) at a time: memory holds a step, the
running sums of `Measures` and the worst tokens, never the whole run (a dump without steps is one
chunk, read whole).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mismatch import runs
from mismatch.commands.progress import Progress, Silent
from mismatch.config import AnalyzeConfig
from mismatch.dumps import Chunk, find_reader
from mismatch.errors import DumpError, RunFolderError
from mismatch.records import DUMP_SIDES, Rollout
from mismatch.report import write_report
from mismatch.stats.corrections import with_thresholds
from mismatch.stats.drift import DRIFT_METRICS, DriftRow, drift
from mismatch.stats.measures import Measures, WorstToken, pair_name, worst_tokens
from mismatch.verdict.gate import evaluate
from mismatch.verdict.recommend import recommend_run

# pair names where the dump does not give its dtypes
ENGINE, TRAINER = DUMP_SIDES
WORST = 25
ASSUMED_TEMPERATURE = "not recorded in the dump: 1 assumed (give --temperature)"


class _Rescorer:
    """The user's model as trainer, in each requested dtype, over the dump's token ids."""

    def __init__(self, model: str, config: AnalyzeConfig):
        from mismatch.model.loading import load_tokenizer, resolve_model

        self.config = config
        self.path = resolve_model(model, trust_remote_code=config.trust_remote_code)
        self.tokenizer = load_tokenizer(self.path, trust_remote_code=config.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.model = None
        self.dtype = ""

    def load(self, dtype: str) -> None:
        from mismatch.model.rescore import load_trainer

        self.model = None  # free the previous dtype's weights first
        self.dtype = dtype
        self.model = load_trainer(self.path, dtype, trust_remote_code=self.config.trust_remote_code)

    def score(self, chunk: Chunk, temperature: float) -> pd.DataFrame:
        """The chunk's rows with `logp_trainer` (and the nucleus columns) from our forward."""
        from mismatch.model.rescore import rescore

        tokens = chunk.tokens
        seqs = list(dict.fromkeys(tokens["seq_id"]))
        missing = [s for s in seqs if s not in chunk.contexts]
        if missing:
            raise DumpError(
                f"sequence {missing[0]} has no prompt token ids, so --model cannot rescore it: "
                "add a prompt_ids field (a list per sequence)"
            )
        assert self.model is not None  # `load` comes first
        vocabulary = self.model.get_input_embeddings().num_embeddings
        for s in seqs:
            ids = np.concatenate([chunk.contexts[s][0], chunk.contexts[s][1]])
            if len(ids) and not 0 <= ids.min() <= ids.max() < vocabulary:
                raise DumpError(
                    f"sequence {s} has token ids outside the model's vocabulary (0 to {vocabulary - 1}): "
                    "the dump was not written with this model's tokenizer, or is damaged"
                )
        rollouts = [
            Rollout(
                prompt_index=0,
                sample_index=0,
                prompt_ids=chunk.contexts[s][0],
                response_ids=chunk.contexts[s][1],
                logp_engine=[],
                finish_reason="",
            )
            for s in seqs
        ]
        scores = rescore(
            self.model,
            self.dtype,
            rollouts,
            temperature=temperature,
            top_p=self.config.top_p,
            pad_id=self.pad_id,
            with_entropy=True,
        )
        starts = dict(zip(seqs, np.cumsum([0] + [len(r.response_ids) for r in rollouts[:-1]]), strict=True))
        at = tokens["seq_id"].map(starts).to_numpy() + tokens["position"].to_numpy()
        lengths = {s: len(r.response_ids) for s, r in zip(seqs, rollouts, strict=True)}
        if (tokens["position"].to_numpy() >= tokens["seq_id"].map(lengths).to_numpy()).any():
            raise DumpError("a token row's position is beyond its sequence's response ids")
        wrong = np.concatenate([r.response_ids for r in rollouts])[at] != tokens["token_id"].to_numpy()
        if wrong.any():  # π would be scored for another token than the one μ is of
            raise DumpError(
                f"sequence {tokens['seq_id'].to_numpy()[wrong][0]}: token_id differs from its response ids "
                f"at position {tokens['position'].to_numpy()[wrong][0]} "
                "(positions count from 0 at the first response token)"
            )
        return tokens.assign(
            **{name: np.concatenate(values)[at] for name, values in scores.items()}, trainer_dtype=self.dtype
        )


def run_analyze(config: AnalyzeConfig, progress: Progress | None = None, *, force: bool = False) -> dict[str, Any]:
    """Analyze the dump in `config.paths` into `config.out`, held for the whole run (`runs.claim`); return its
    summary (also summary.json)."""
    with runs.claim(config.out, force=force):
        return _analyze(config, progress or Silent())


def _analyze(config: AnalyzeConfig, progress: Progress) -> dict[str, Any]:
    reader = find_reader(config.paths, config.format)
    log = runs.RunLog(config.out, "analyze", config.to_json())
    summary = log.summary
    stage = log.stage
    summary["format"] = reader.NAME
    seed = config.seed if config.seed is not None else _scan_seed(config.paths)
    summary["seed"] = seed
    measures = Measures(with_thresholds(config.corrections), seed)
    worst: list[WorstToken] = []
    steps: set[int] = set()
    temperature = config.temperature
    summary["temperature_source"] = "--temperature"
    rescorer = None
    if config.model:
        with stage("load_tokenizer"):
            rescorer = _Rescorer(config.model, config)
    with runs.parquet_sink(config.out / runs.TOKENS, runs.ANALYZE_TOKEN_COLUMNS) as write:
        for trainer in [None, *(config.dtypes if rescorer else [])]:
            scorer = rescorer if trainer else None  # rescores the dump's tokens in `trainer`; None: the dump's π
            with stage(f"read_{trainer or 'dump'}"):
                if scorer and trainer:
                    scorer.load(trainer)
                advance = progress.stage(f"{reader.NAME}: " + (f"rescore in {trainer}" if trainer else "read"), None)
                for chunk in reader.read(config.paths):
                    if temperature is None:
                        temperature, summary["temperature_source"] = _dump_temperature(chunk)
                    # decided on the first step; a later step's missing π counts as non-finite
                    if "dump_has_trainer" not in summary:
                        summary["dump_has_trainer"] = _has_trainer(chunk)
                    if trainer is None and not summary["dump_has_trainer"]:
                        if rescorer is None:
                            raise DumpError(
                                f"{config.paths[0]} carries only μ (no logp_trainer): "
                                "pass --model (and --temperature, --top-p as sampled) to compute π"
                            )
                        break
                    tokens = _rows(scorer.score(chunk, temperature) if scorer else chunk.tokens, rescorer)
                    write(tokens)
                    has_steps = "step" in chunk.tokens
                    if has_steps:
                        steps.update(tokens["step"].unique().tolist())
                    measures.add(
                        tokens.assign(cluster=_clusters(tokens, has_steps)),
                        int(tokens["step"].to_numpy()[0]) if has_steps else None,
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
        corrections = measures.corrections_rows()
        drifts = _drift(step_frame) if len(steps) > 1 else []
        summary |= {
            "temperature": temperature,
            "n_steps": len(steps),
            "pairs": pairs,
            "corrections": corrections,
            "buckets": measures.bucket_rows(),
            "growth": measures.growth_rows(),
            "health": health,
            "audit": audit,
            "audit_by_pair": audit_by_pair,
            "drift": drifts,
            "worst_tokens": worst,
        }
        summary["recommendation"] = recommend_run(
            pairs, health=health, audit=audit, drift=drifts, corrections=corrections
        )
        if config.fail_on:
            summary["gate"] = evaluate(config.conditions(), pairs, every_pair=True)
    log.finish()
    with stage("report"):
        write_report(config.out)
    return summary


def _scan_seed(paths) -> int:
    """The seed of the scan whose tokens are analysed (so its intervals come out the same), else 0."""
    folder = paths[0] if paths[0].is_dir() else paths[0].parent
    if len(paths) == 1 and (folder / runs.SUMMARY).is_file():
        try:
            return int(runs.scan_settings(folder)["sampling"]["seed"])
        except RunFolderError:
            pass
    return 0


def _has_trainer(chunk: Chunk) -> bool:
    """Whether the dump carries π (a `logp_trainer` column that is not all null)."""
    return "logp_trainer" in chunk.tokens and bool(chunk.tokens["logp_trainer"].notna().any())


def _dump_temperature(chunk: Chunk) -> tuple[float, str]:
    """The sampling temperature the dump records, else 1 (what rescoring then applies)."""
    if "temperature" in chunk.tokens and chunk.tokens["temperature"].notna().any():
        return float(chunk.tokens["temperature"].dropna().to_numpy()[0]), "the dump"
    return 1.0, ASSUMED_TEMPERATURE


def _rows(tokens: pd.DataFrame, rescorer) -> pd.DataFrame:
    """Open-format rows completed to ANALYZE_TOKEN_COLUMNS (defaults where the dump is silent)."""
    tokens = tokens.copy()
    defaults: dict[str, Any] = {"step": 0, "engine_dtype": ENGINE, "trainer_dtype": TRAINER, "finish_reason": None}
    for column, value in defaults.items():
        if column not in tokens:
            tokens[column] = value
    if "prompt_index" not in tokens:
        tokens["prompt_index"] = tokens["seq_id"]  # no groups: each sequence its own unit
    if "logp_trainer_full" not in tokens:
        tokens["logp_trainer_full"] = tokens["logp_trainer"]
    if "log_kept_mass" not in tokens:
        tokens["log_kept_mass"] = 0.0
    if "entropy" not in tokens:
        tokens["entropy"] = np.nan
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
    # one int per (step, prompt)
    keys = pd.util.hash_pandas_object(tokens[["step", "prompt_index"]], index=False).to_numpy().view(np.int64)
    return pd.Series(keys, index=tokens.index)


def _worst(kept: list[WorstToken], tokens: pd.DataFrame, chunk: Chunk, rescorer) -> list[WorstToken]:
    def prompt_of(engine_dtype, seq_id) -> str:
        context = chunk.contexts.get(int(seq_id))
        return rescorer.tokenizer.decode(context[0]) if rescorer and context else ""

    found = worst_tokens(tokens, prompt_of, WORST)
    return sorted(kept + found, key=lambda row: row["abs_log_ratio"], reverse=True)[:WORST]


def _drift(step_frame: pd.DataFrame) -> list[DriftRow]:
    return [
        DriftRow(pair=pair_name(engine, trainer), **drift(group["step"], group[metric], metric))
        for (engine, trainer), group in step_frame.sort_values("step").groupby(
            ["engine_dtype", "trainer_dtype"], sort=False
        )
        for metric in DRIFT_METRICS
    ]
