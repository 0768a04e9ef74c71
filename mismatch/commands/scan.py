"""`mismatch scan` as a library call: prompts → engine (μ) → rescoring per dtype (π) → metrics → files."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mismatch import runs
from mismatch.commands.progress import Progress, Silent
from mismatch.config import REFERENCE_DTYPE, ScanConfig
from mismatch.engines import lora_refused_dtypes, refused_dtypes, start_engine
from mismatch.engines.base import Rows
from mismatch.errors import EngineError, PromptError, ResumeError
from mismatch.inputs.prepare import Inputs, prepare_inputs
from mismatch.learner.impact import rollout_impact
from mismatch.learner.losses import group_advantages
from mismatch.learner.rewards import rollout_rewards
from mismatch.model.loading import available_memory, fp32_footprint
from mismatch.model.lora import adapter_gap, merge_into, read_adapter
from mismatch.model.probes import ActivationPeak
from mismatch.model.rescore import distribution_rows, input_device, load_trainer, rescore
from mismatch.model.routing import Routing, agreement_rows, is_moe, response_routing
from mismatch.records import Rollout
from mismatch.report import write_report
from mismatch.stats.distribution import DistributionSummary, compare_rows, distribution_record
from mismatch.stats.impact import ImpactResult
from mismatch.stats.measures import Measures
from mismatch.verdict.gate import evaluate
from mismatch.verdict.recommend import recommend

# FP16 backward: the coefficients scaled up as a loss scale is (GradScaler's first, then lower on overflow)
IMPACT_FP16_SCALES = (2.0**16, 2.0**8, 1.0)

RESUME_KEYS = (
    "model",
    "engine",
    "sampling",
    "prompts",
    "num_prompts",
    "samples",
    "chat_template",
    "max_model_len",
    "lora",
)


def run_scan(
    config: ScanConfig, progress: Progress | None = None, *, resume: bool = False, force: bool = False
) -> dict[str, Any]:
    """Run a scan into `config.out` and return its summary (also written as summary.json).

    The folder must be empty unless `force` (an earlier run's files are then removed); with `resume`
    the engine outputs already saved there by an interrupted run of the same scan are reused instead
    of generated again. The folder is held for the whole scan (`runs.claim`).
    """
    if resume and config.lora:
        raise ResumeError(
            "--resume does not cover --lora scans yet (two models' outputs); run the scan again without --resume"
        )
    with runs.claim(config.out, force=force, keep=resume):
        return _scan(config, progress or Silent(), saved=_resumable(config) if resume else {})


def _scan(config: ScanConfig, progress: Progress, *, saved: dict[str, list[Rollout]]) -> dict[str, Any]:
    out = config.out
    log = runs.RunLog(out, "scan", config.to_json())
    summary = log.summary
    stage = log.stage

    with stage("prepare"):
        inputs = prepare_inputs(config)
        model_path = inputs.model_path
        tokenizer = inputs.tokenizer
        prompt_ids = inputs.prompt_ids
        summary["skipped_prompts"] = inputs.skipped
        impact_on = measures_impact(config, inputs.answers)
        summary["config"]["model_path"] = str(model_path)

    rollouts: dict[str, list[Rollout]] = {d: r for d, r in saved.items() if d in [*config.dtypes, REFERENCE_DTYPE]}
    with stage("check_dtypes"):
        probe = semantic_probe_plan(config, model_path, len(prompt_ids))
        asked = [
            d
            for d in dict.fromkeys([*config.dtypes, *([REFERENCE_DTYPE] if probe["prompts"] else [])])
            if d not in rollouts
        ]
        refused = refused_dtypes(config.engine, model_path, asked, config.trust_remote_code)
        if config.lora:  # both sides run the same requests: a dtype the adapter cannot be served in is left out
            refused = lora_refused_dtypes(config.engine, asked) | refused
        summary["refused_dtypes"] = refused
        accepted = [d for d in config.dtypes if d not in refused]
        if not accepted:
            raise EngineError(
                f"{config.engine} refuses every requested dtype for this model: "
                + "; ".join(f"{d}: {r}" for d, r in refused.items())
            )
        probe = probe_after_refusals(probe, refused)
        summary["semantic_probe"] = probe
    requests: list[Request] = [(d, prompt_ids, config.samples) for d in accepted]
    if probe["prompts"] and REFERENCE_DTYPE not in accepted:  # FP32 engine on a few prompts: the probe
        requests.append((REFERENCE_DTYPE, prompt_ids[: probe["prompts"]], 1))
    reference_generated = REFERENCE_DTYPE in rollouts or any(d == REFERENCE_DTYPE for d, _, _ in requests)
    pairs = scan_pairs(config, accepted, list(refused), reference_generated)
    summary["reference"] = reference_plan(config, model_path)
    routing = config.engine == "vllm" and is_moe(model_path, config.trust_remote_code)
    scanned = sample_and_rescore(
        config,
        Side(model_path, config.lora, out / runs.ROLLOUTS, routing=routing),
        requests,
        pairs,
        tokenizer=tokenizer,
        log=log,
        progress=progress,
        rollouts=rollouts,
    )
    if config.lora:  # the same scan of the base with the adapter merged in: what the adapter path adds
        with stage("merge_adapter"):
            folder = merge_into(
                model_path,
                config.lora,
                Path(tempfile.mkdtemp(prefix=".merged-model-", dir=out)),
                config.trust_remote_code,
            )
        try:
            merged = sample_and_rescore(
                config,
                Side(folder, None, out / runs.MERGED_ROLLOUTS, "merged"),
                requests,
                pairs,
                tokenizer=tokenizer,
                log=log,
                progress=progress,
                rollouts={},
            )
        finally:
            shutil.rmtree(folder)

    if impact_on:
        with stage("impact"):
            summary["impact"] = gradient_impact(config, scanned, accepted, inputs=inputs, progress=progress)
    with stage("metrics"):
        tokens, measures = measured(scanned, tokenizer, config)
        pairs_list = measures.pair_rows()
        audit, audit_by_pair = measures.audit_rows(config.sampling.temperature)
        runs.write_parquet(out / runs.TOKENS, tokens)
        metrics = pd.DataFrame(pairs_list)
        if config.lora:
            merged_tokens, merged_measures = measured(merged, tokenizer, config)
            runs.write_parquet(out / runs.MERGED_TOKENS, merged_tokens)
            merged_pairs = merged_measures.pair_rows()
            summary["lora"] = {
                "adapter": asdict(read_adapter(config.lora)) | {"path": str(config.lora)},
                "merged_pairs": merged_pairs,
                "comparison": adapter_gap(pairs_list, merged_pairs),
            }
            metrics = pd.concat([metrics.assign(variant="lora"), pd.DataFrame(merged_pairs).assign(variant="merged")])
        runs.write_csv(out / runs.METRICS_CSV, metrics)
        if scanned.routes:
            routed = runs.routing_frame(scanned.rollouts, scanned.routes, config.samples)
            runs.write_parquet(out / runs.ROUTING, routed)
            summary["routing"] = agreement_rows(routed, tokens)
        adapter_comparison = summary["lora"]["comparison"] if config.lora else None
        routing_gap = summary["routing"]["gap"] if scanned.routes else None
        summary |= {
            "pairs": pairs_list,
            "corrections": measures.corrections_rows(),
            "buckets": measures.bucket_rows(),
            "health": measures.health_rows(),
            "audit": audit,
            "audit_by_pair": audit_by_pair,
            "recommendation": recommend(
                pairs_list,
                fp16_headroom=summary.get("fp16_headroom"),
                refused=refused,
                probe=probe,
                engine=config.engine,
                lora=adapter_comparison,
                routing=routing_gap,
                impact=summary.get("impact"),
            ),
        }
        if config.fail_on:
            summary["gate"] = evaluate(config.conditions(), pairs_list)
        if config.full_distribution:
            planned = config.distribution_plan(len(prompt_ids) * config.samples, len(tokenizer)) or {}
            summary["distribution"] = distribution_record(
                sum(map(len, planned.values())), scanned.distribution, scanned.unavailable
            )
    log.finish()  # the report reads the complete run folder
    with stage("report"):
        write_report(out)
    return summary


def measures_impact(config: ScanConfig, answers: list[str | None]) -> bool:
    """Whether the scan measures the gradient impact: asked for, or by default when it can (answers, ≥ 2 samples)."""
    has_answers = all(a is not None for a in answers)
    if config.impact and not has_answers:
        raise PromptError("--impact needs an 'answer' on every prompt: the reward is computed against it")
    return config.impact if config.impact is not None else has_answers and config.samples >= 2


def gradient_impact(
    config: ScanConfig, scanned: Scanned, accepted: list[str], *, inputs: Inputs, progress: Progress
) -> dict[str, ImpactResult]:
    """Per engine dtype, the bias its mismatch puts in a GRPO gradient against the gradient's noise, on
    its own rollouts: the trainer in the same dtype at θ = θ′ (the model scanned), rewards from the answers,
    advantages normalised per prompt; the FP32 trainer's gradient for the rounding check (unless
    --reference none)."""
    results: dict[str, ImpactResult] = {}
    pad_id = inputs.tokenizer.pad_token_id if inputs.tokenizer.pad_token_id is not None else 0
    answers = [str(a) for a in inputs.answers]
    reference = None
    if config.reference != "none" and accepted != [REFERENCE_DTYPE]:
        reference = trainable(load_trainer(inputs.model_path, REFERENCE_DTYPE, **_trainer_options(config)), config)
    for dtype in accepted:
        advance = progress.stage(f"gradient impact {dtype}", 1)
        rollouts = scanned.rollouts[dtype]
        texts = inputs.tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
        rewards = rollout_rewards(texts, answers, [r.prompt_index for r in rollouts])
        model = trainable(load_trainer(inputs.model_path, dtype, **_trainer_options(config)), config)
        # π over the whole tempered distribution: a trainer's loss takes no nucleus (= logp_trainer at top-p 1)
        logp_old = np.concatenate(scanned.scores[dtype, dtype]["logp_trainer_full"])
        for scale in IMPACT_FP16_SCALES if dtype == "fp16" else (1.0,):
            results[dtype] = rollout_impact(
                model,
                dtype,
                rollouts,
                logp_old=torch.tensor(logp_old, dtype=torch.float32, device=input_device(model)),
                advantages=group_advantages(torch.tensor(rewards), config.samples).to(input_device(model)),
                algo="grpo",
                temperature=config.sampling.temperature,
                pad_id=pad_id,
                reference_model=None if dtype == REFERENCE_DTYPE else reference,
                scale=scale,
                seed=config.sampling.seed,
                user_batch=config.train_batch,
            )
            if "non-finite" not in (results[dtype]["reason"] or ""):
                break
        del model
        advance(1)
    return results


def trainable(model, config: ScanConfig):
    """The parameters a trainer would update take gradients: a LoRA adapter's, else every one."""
    for name, param in model.named_parameters():
        param.requires_grad_(not config.lora or "lora_" in name)
    return model


def _trainer_options(config: ScanConfig) -> dict[str, Any]:
    return {"trust_remote_code": config.trust_remote_code, "lora": config.lora}


def measured(scanned: Scanned, tokenizer, config: ScanConfig) -> tuple[pd.DataFrame, Measures]:
    """The token rows of a scanned model and everything measured on them."""
    tokens = runs.tokens_frame(scanned.rollouts, scanned.scores, tokenizer, config.samples)
    measures = Measures(seed=config.sampling.seed)
    measures.add(tokens)
    return tokens, measures


@dataclass
class Side:
    """What one scanned model is: its folder, the LoRA adapter both sides apply to it (or None), where
    its engine outputs are saved, and the prefix of its stage names and labels."""

    model_path: Path
    lora: Path | None
    rollouts_file: Path
    name: str = ""
    routing: bool = False  # an MoE model on vLLM: record the engine's and each trainer's experts


Request = tuple[str, list[list[int]], int]
"""What one engine generates: (engine dtype, prompts' token ids, samples per prompt)."""

Pair = tuple[str, str]
"""(engine dtype, trainer dtype)."""


@dataclass
class Scanned:
    """One scanned model's engine outputs and the trainer's view of them."""

    rollouts: dict[str, list[Rollout]]  # engine dtype → its sampled sequences
    scores: dict[Pair, dict[str, list[np.ndarray]]]  # pair → `rescore`'s columns, in the configured order
    routes: dict[Pair, Routing]  # pair → the trainer's routing (`response_routing`): MoE models on vLLM only
    # --full-distribution: pair → the engine's and the trainer's whole distributions compared at the planned
    # positions; engine dtype → why it has none
    distribution: dict[Pair, DistributionSummary] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


def sample_and_rescore(
    config: ScanConfig,
    side: Side,
    requests: list[Request],
    pairs: list[Pair],
    *,
    tokenizer,
    log: runs.RunLog,
    progress: Progress,
    rollouts: dict[str, list[Rollout]],
) -> Scanned:
    """Engine outputs (μ) for each request not already in `rollouts`, then the trainer's π for every
    pair. The FP16 trainer's activation headroom of the scanned model goes into the summary."""
    stage = log.stage
    prefix = f"{side.name}_" if side.name else ""
    label = f"{side.name} " if side.name else ""
    engine_rows: dict[str, Rows | str] = {}  # --full-distribution, the scanned model's engine dtypes
    for dtype, prompts_for, samples in requests:
        plan = config.distribution_plan(len(prompts_for) * samples, len(tokenizer)) if dtype in config.dtypes else None
        if side.name:  # the merged model is scanned for its sampled-token gap only
            plan = None
        if len(rollouts.get(dtype, [])) == len(prompts_for) * samples:  # saved by the run being resumed
            log.summary["finished"].append(f"{prefix}generate_{dtype} (resumed)")
            if plan is not None:
                engine_rows[dtype] = (
                    "resumed from saved rollouts: the engine's distribution is recorded only as it samples"
                )
            continue
        with stage(f"{prefix}engine_start_{dtype}"):
            options = config.vllm_options() | ({"record_routing": True} if side.routing else {})
            engine = start_engine(
                config.engine,
                side.model_path,
                dtype,
                trust_remote_code=config.trust_remote_code,
                lora=side.lora,
                **options,
            )
            log.summary["engine_execution"] = engine.execution  # eager or compiled graphs, as the engine resolved it
        with stage(f"{prefix}generate_{dtype}"):
            advance = progress.stage(f"{label}generate {config.engine} {dtype}", len(prompts_for) * samples)
            try:
                if plan is None:
                    rollouts[dtype] = engine.generate(prompts_for, samples, config.sampling, advance)
                else:
                    rollouts[dtype], engine_rows[dtype] = engine.generate_rows(
                        prompts_for, samples, config.sampling, plan, advance
                    )
            finally:
                engine.close()
            runs.write_parquet(side.rollouts_file, runs.rollouts_frame(rollouts, tokenizer, config.samples))

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: dict[Pair, dict[str, list[np.ndarray]]] = {}
    routes: dict[Pair, Routing] = {}
    compared: dict[Pair, DistributionSummary] = {}
    for trainer_dtype in dict.fromkeys(t for _, t in pairs):
        with stage(f"{prefix}rescore_{trainer_dtype}"):
            model = load_trainer(
                side.model_path, trainer_dtype, trust_remote_code=config.trust_remote_code, lora=side.lora
            )
            watch = ActivationPeak(model) if trainer_dtype == "fp16" and not side.name else contextlib.nullcontext()
            with watch:
                for engine_dtype in [e for e, t in pairs if t == trainer_dtype]:
                    chosen = rollouts[engine_dtype]
                    text = f"{label}rescore {engine_dtype} → {trainer_dtype}"
                    if trainer_dtype == REFERENCE_DTYPE and engine_dtype != REFERENCE_DTYPE:
                        chosen = chosen[: config.reference_sequences()]  # the first N, or all
                        fp32_gib = log.summary["reference"]["fp32_gib"]
                        text += (
                            f" (reference: {len(chosen)} of {len(rollouts[engine_dtype])} sequences,"
                            f" {fp32_gib:.2f} GiB of FP32 weights)"
                        )
                    advance = progress.stage(text, len(chosen))
                    scores[engine_dtype, trainer_dtype] = rescore(
                        model,
                        trainer_dtype,
                        chosen,
                        temperature=config.sampling.temperature,
                        top_p=config.sampling.top_p,
                        pad_id=pad_id,
                        progress=advance,
                        with_entropy=True,  # tokens.parquet `entropy`: the gap by kind of position
                    )
                    rows = engine_rows.get(engine_dtype)
                    if isinstance(rows, Rows):
                        rows = rows.before(len(chosen))  # the reference may score the first sequences only
                    if isinstance(rows, Rows):
                        chunks = distribution_rows(
                            model,
                            trainer_dtype,
                            chosen,
                            (rows.request, rows.position),
                            temperature=config.sampling.temperature,
                            top_p=config.sampling.top_p,
                            pad_id=pad_id,
                        )
                        compared[engine_dtype, trainer_dtype] = compare_rows(
                            rows.logp, chunks, rows.tokens(chosen), rows.prompts(chosen), seed=config.sampling.seed
                        )
                    # resumed outputs carry no routing
                    if side.routing and all(r.routed_experts is not None for r in chosen):
                        routes[engine_dtype, trainer_dtype] = response_routing(model, chosen, pad_id)
            if isinstance(watch, ActivationPeak):
                log.summary["fp16_headroom"] = watch.summary()
            del model
    return Scanned(
        rollouts,
        {pair: scores[pair] for pair in pairs},  # table rows in the configured order
        routes,
        {pair: compared[pair] for pair in pairs if pair in compared},
        {dtype: rows for dtype, rows in engine_rows.items() if isinstance(rows, str)},
    )


def scan_pairs(config: ScanConfig, accepted: list[str], refused: list[str], reference_generated: bool) -> list[Pair]:
    """The configured pairs of the dtypes the engine accepted; each refused dtype on the trainer side
    of every accepted one (its headroom and gap are the only FP16 evidence left); and the semantic
    probe, FP32 engine against FP32 trainer, when it ran."""
    pairs = [(e, t) for e, t in config.pairs() if e in accepted]
    pairs += [(e, t) for e in accepted for t in refused if t != REFERENCE_DTYPE]
    if reference_generated:
        pairs.append((REFERENCE_DTYPE, REFERENCE_DTYPE))
    return list(dict.fromkeys(pairs))


def semantic_probe_plan(config: ScanConfig, model_path, n_prompts: int) -> dict[str, Any]:
    """How many prompts the FP32-engine-against-FP32-trainer probe scores, or why it is skipped."""
    if REFERENCE_DTYPE in config.dtypes:
        return {"prompts": n_prompts, "note": "the fp32 engine dtype is scanned in full"}
    if config.semantic_probe == 0:
        return {"prompts": 0, "skipped": "--semantic-probe 0"}
    if config.reference == "none":
        return {"prompts": 0, "skipped": "--reference none (the probe is scored by the FP32 trainer)"}
    need = fp32_footprint(model_path)
    available = available_memory()
    if need > 0.8 * available:
        return {
            "prompts": 0,
            "skipped": f"an FP32 copy of the model needs {need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available",
        }
    return {"prompts": min(config.semantic_probe, n_prompts)}


def probe_after_refusals(probe: dict[str, Any], refused: dict[str, str]) -> dict[str, Any]:
    """The semantic probe's plan once the engine has said which dtypes it refuses: skipped, with its reason,
    when fp32 is one (e.g. a --lora scan where vLLM's LoRA kernels take fp16/bf16 only)."""
    if REFERENCE_DTYPE in refused:
        return {"prompts": 0, "skipped": f"the engine refuses fp32 ({refused[REFERENCE_DTYPE]})"}
    return probe


def reference_plan(config: ScanConfig, model_path) -> dict[str, Any]:
    """What the FP32 reference costs and covers, known before it loads: summary.json `reference`."""
    return {
        "sequences": config.reference,
        "fp32_gib": round(fp32_footprint(model_path) / 2**30, 3),
        "available_gib": round(available_memory() / 2**30, 3),
    }


def _resumable(config: ScanConfig) -> dict[str, list[Rollout]]:
    """The engine outputs saved by an earlier, unfinished run of the same scan."""
    if not (config.out / runs.SUMMARY).is_file():
        raise ResumeError(f"--resume: {config.out} holds no scan to resume (no summary.json)")
    previous = runs.read_summary(config.out, ("scan",))["config"]
    current = config.to_json()
    changed = [
        f"--{k.replace('_', '-')} ({previous.get(k)} then, {current.get(k)} now)"
        for k in RESUME_KEYS
        if previous.get(k) != current.get(k)
    ]
    if changed:
        raise ResumeError(f"--resume: the saved run in {config.out} used other settings: {', '.join(changed)}")
    return runs.read_rollouts(config.out)
