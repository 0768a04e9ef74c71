"""`mismatch scan` as a library call: prompts → engine (μ) → rescoring per dtype (π) → metrics → files."""

from __future__ import annotations

import contextlib
import numpy as np
import pandas as pd

from mismatch import runs
from mismatch.progress import Progress, Silent
from mismatch.config import REFERENCE_DTYPE, ScanConfig
from mismatch.diagnose.probes import ActivationPeak
from mismatch.engines import Rollout, refused_dtypes, start_engine
from mismatch.errors import EngineError, ResumeError
from mismatch.gate import evaluate
from mismatch.measures import Measures
from mismatch.inputs import prepare_inputs
from mismatch.models import available_memory, fp32_footprint
from mismatch.recommend import recommend
from mismatch.report import write_report
from mismatch.rescore import load_trainer, rescore

RESUME_KEYS = ("model", "engine", "sampling", "prompts", "num_prompts", "samples", "chat_template", "max_model_len")


def run_scan(config: ScanConfig, progress: Progress | None = None, resume: bool = False, force: bool = False) -> dict:
    """Run a scan into `config.out` and return its summary (also written as summary.json).

    The folder must be empty unless `force`; with `resume` the engine outputs already saved there
    by an interrupted run of the same scan are reused instead of generated again.
    """
    progress = progress or Silent()
    out = config.out
    if resume:
        saved = _resumable(config)
    else:
        runs.check_output_dir(out, force)
        saved = {}
    log = runs.RunLog(out, "scan", config.to_json())
    summary, stage = log.summary, log.stage

    with stage("prepare"):
        inputs = prepare_inputs(config)
        model_path, tokenizer, prompt_ids = inputs.model_path, inputs.tokenizer, inputs.prompt_ids
        summary["skipped_prompts"], summary["config"]["model_path"] = inputs.skipped, str(model_path)

    rollouts: dict[str, list[Rollout]] = {d: r for d, r in saved.items() if d in [*config.dtypes, REFERENCE_DTYPE]}
    with stage("check_dtypes"):
        probe = semantic_probe_plan(config, model_path, len(prompt_ids))
        asked = [d for d in dict.fromkeys([*config.dtypes, *([REFERENCE_DTYPE] if probe["prompts"] else [])]) if d not in rollouts]
        summary["refused_dtypes"] = refused_dtypes(config.engine, model_path, asked, config.trust_remote_code)
        accepted = [d for d in config.dtypes if d not in summary["refused_dtypes"]]
        if not accepted:
            raise EngineError(f"{config.engine} refuses every requested dtype for this model: " + "; ".join(f"{d}: {r}" for d, r in summary["refused_dtypes"].items()))
        if REFERENCE_DTYPE in summary["refused_dtypes"]:
            probe = {"prompts": 0, "skipped": f"the engine refuses fp32 ({summary['refused_dtypes'][REFERENCE_DTYPE]})"}
        summary["semantic_probe"] = probe
    requests = [(d, prompt_ids, config.samples) for d in accepted]
    if probe["prompts"] and REFERENCE_DTYPE not in accepted:  # FP32 engine on a few prompts: the probe
        requests.append((REFERENCE_DTYPE, prompt_ids[: probe["prompts"]], 1))
    for dtype, prompts_for, samples in requests:
        if len(rollouts.get(dtype, [])) == len(prompts_for) * samples:  # saved by the run being resumed
            summary["finished"].append(f"generate_{dtype} (resumed)")
            continue
        with stage(f"engine_start_{dtype}"):
            engine = start_engine(config.engine, model_path, dtype, trust_remote_code=config.trust_remote_code, **config.vllm_options())
        with stage(f"generate_{dtype}"):
            advance = progress.stage(f"generate {config.engine} {dtype}", len(prompts_for) * samples)
            try:
                rollouts[dtype] = engine.generate(prompts_for, samples, config.sampling, advance)
            finally:
                engine.close()
            runs.write_parquet(out / runs.ROLLOUTS, runs.rollouts_frame(rollouts, tokenizer, config.samples))

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: dict[tuple[str, str], dict[str, list[np.ndarray]]] = {}
    pairs = scan_pairs(config, accepted, list(summary["refused_dtypes"]), REFERENCE_DTYPE in rollouts)
    summary["reference"] = reference_plan(config, model_path)
    for trainer_dtype in dict.fromkeys(t for _, t in pairs):
        with stage(f"rescore_{trainer_dtype}"):
            model = load_trainer(model_path, trainer_dtype, trust_remote_code=config.trust_remote_code)
            watch = ActivationPeak(model) if trainer_dtype == "fp16" else contextlib.nullcontext()
            with watch:
                for engine_dtype in [e for e, t in pairs if t == trainer_dtype]:
                    chosen = rollouts[engine_dtype]
                    label = f"rescore {engine_dtype} → {trainer_dtype}"
                    if trainer_dtype == REFERENCE_DTYPE and engine_dtype != REFERENCE_DTYPE:
                        chosen = chosen[: config.reference_sequences()]  # the first N, or all
                        label += f" (reference: {len(chosen)} of {len(rollouts[engine_dtype])} sequences, {summary['reference']['fp32_gib']:.2f} GiB of FP32 weights)"
                    advance = progress.stage(label, len(chosen))
                    scores[engine_dtype, trainer_dtype] = rescore(model, trainer_dtype, chosen, config.sampling.temperature, config.sampling.top_p, pad_id, advance)
            if isinstance(watch, ActivationPeak):
                summary["fp16_headroom"] = watch.summary()
            del model
    scores = {pair: scores[pair] for pair in pairs}  # table rows in the configured order

    with stage("metrics"):
        tokens = runs.tokens_frame(rollouts, scores, tokenizer, config.samples)
        measures = Measures(seed=config.sampling.seed)
        measures.add(tokens)
        pairs_list = measures.pair_rows()
        audit, audit_by_pair = measures.audit_rows(config.sampling.temperature)
        runs.write_parquet(out / runs.TOKENS, tokens)
        runs.write_csv(out / runs.METRICS_CSV, pd.DataFrame(pairs_list))
        summary |= {
            "pairs": pairs_list,
            "corrections": measures.corrections_rows(),
            "health": measures.health_rows(),
            "audit": audit,
            "audit_by_pair": audit_by_pair,
            "recommendation": recommend(pairs_list, summary.get("fp16_headroom"), summary["refused_dtypes"], summary["semantic_probe"], config.engine),
        }
        if config.fail_on:
            summary["gate"] = evaluate(config.conditions(), pairs_list)
    log.finish()  # the report reads the complete run folder
    with stage("report"):
        write_report(out)
    return summary


def scan_pairs(config: ScanConfig, accepted: list[str], refused: list[str], reference_generated: bool) -> list[tuple[str, str]]:
    """The configured pairs of the dtypes the engine accepted; each refused dtype on the trainer side
    of every accepted one (its headroom and gap are the only FP16 evidence left); and the semantic
    probe, FP32 engine against FP32 trainer, when it ran."""
    pairs = [(e, t) for e, t in config.pairs() if e in accepted]
    pairs += [(e, t) for e in accepted for t in refused if t != REFERENCE_DTYPE]
    if reference_generated:
        pairs.append((REFERENCE_DTYPE, REFERENCE_DTYPE))
    return list(dict.fromkeys(pairs))


def semantic_probe_plan(config: ScanConfig, model_path, n_prompts: int) -> dict:
    """How many prompts the FP32-engine-against-FP32-trainer probe scores, or why it is skipped."""
    if REFERENCE_DTYPE in config.dtypes:
        return {"prompts": n_prompts, "note": "the fp32 engine dtype is scanned in full"}
    if config.semantic_probe == 0:
        return {"prompts": 0, "skipped": "--semantic-probe 0"}
    if config.reference == "none":
        return {"prompts": 0, "skipped": "--reference none (the probe is scored by the FP32 trainer)"}
    need, available = fp32_footprint(model_path), available_memory()
    if need > 0.8 * available:
        return {"prompts": 0, "skipped": f"an FP32 copy of the model needs {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"}
    return {"prompts": min(config.semantic_probe, n_prompts)}


def reference_plan(config: ScanConfig, model_path) -> dict:
    """What the FP32 reference costs and covers, known before it loads: summary.json `reference`."""
    return {"sequences": config.reference, "fp32_gib": round(fp32_footprint(model_path) / 2**30, 3), "available_gib": round(available_memory() / 2**30, 3)}


def _resumable(config: ScanConfig) -> dict[str, list[Rollout]]:
    """The engine outputs saved by an earlier, unfinished run of the same scan."""
    if not (config.out / runs.SUMMARY).is_file():
        raise ResumeError(f"--resume: {config.out} holds no scan to resume (no summary.json)")
    previous = runs.read_summary(config.out, ("scan",))["config"]
    current = config.to_json()
    changed = [f"--{k.replace('_', '-')} ({previous.get(k)} then, {current.get(k)} now)" for k in RESUME_KEYS if previous.get(k) != current.get(k)]
    if changed:
        raise ResumeError(f"--resume: the saved run in {config.out} used other settings: {', '.join(changed)}")
    return runs.read_rollouts(config.out)
