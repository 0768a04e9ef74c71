"""`mismatch diagnose` as a library call: where the gap comes from, by controlled comparisons on
the very same sampled tokens, each isolating one source.

Every comparison is between two scorings of the same response tokens, stored side by side in
tokens.parquet (one column per scoring), and summarised with the scan's metrics (the first
column of a component plays μ, the second π):

    total                     engine decode (μ, as sampled)   vs trainer, same dtype
    semantic                  engine FP32 (prefill)           vs trainer FP32
    engine_decode_vs_prefill  engine decode                   vs engine prefill, same dtype
    engine_batch              engine prefill, each alone      vs engine prefill, one shuffled batch
    trainer_batch             trainer, micro-batch 1          vs trainer, padded batch
    (the two batch components on the first `alone_sequences` sequences: one call per sequence)
    engine_precision          engine FP32 (prefill)           vs engine prefill in the dtype
    trainer_precision         trainer FP32                    vs trainer in the dtype

Work that does not depend on the engine dtype (the FP32 engine and trainer) is done once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from mismatch import runs
from mismatch.commands.progress import Progress, Silent
from mismatch.config import REFERENCE_DTYPE, DiagnoseConfig
from mismatch.engines import refused_dtypes, start_engine
from mismatch.engines.base import Rows
from mismatch.errors import EngineError
from mismatch.inputs.prepare import Inputs, prepare_inputs
from mismatch.model.probes import FP16_MAX, ActivationPeak
from mismatch.model.rescore import distribution_rows, load_trainer, rescore
from mismatch.model.routing import Routing, agreement_rows, is_moe, response_routing
from mismatch.model.views import layer_errors, layer_states, score_alone, topk_rows
from mismatch.records import Rollout, Scored, seq_id
from mismatch.stats.distribution import DistributionSummary, compare_rows, distribution_record
from mismatch.stats.metrics import pair_metrics
from mismatch.verdict.recommend import Recommendation, with_router_replay

COMPONENTS = {  # name: (reference scoring, compared scoring)
    "total": ("logp_engine_decode", "logp_trainer"),
    "semantic": ("logp_engine_fp32", "logp_trainer_fp32"),
    "engine_decode_vs_prefill": ("logp_engine_decode", "logp_engine_prefill"),
    "engine_batch": ("logp_engine_alone", "logp_engine_prefill"),
    "trainer_batch": ("logp_trainer_alone", "logp_trainer"),
    "engine_precision": ("logp_engine_fp32", "logp_engine_prefill"),
    "trainer_precision": ("logp_trainer_fp32", "logp_trainer"),
}
PRECISION_ONLY = ("engine_precision", "trainer_precision")  # identically 0 for the FP32 engine dtype
FROM_SAVED = "the rollouts come from a saved run (--from): the engine's distribution is recorded only as it samples"

EngineSide = dict[str, dict[str, list[Scored]]]
"""Per engine dtype, the engine's prefill scorings of its sequences: "prefill" (one shuffled batch),
"alone" (each in a batch of its own) and "fp32" (the FP32 engine)."""


@dataclass
class TrainerSide:
    """What the trainer computed in `_trainer_side`."""

    scores: dict[str, dict[str, list[np.ndarray]]]  # engine dtype → "fp32", "batched", "alone" → log π
    layers: list[dict[str, Any]] = field(default_factory=list)  # per trainer dtype: error and peak per layer
    topk_frames: list[pd.DataFrame] = field(default_factory=list)  # per engine dtype: `topk_rows`
    routes: dict[tuple[str, str], Routing] = field(default_factory=dict)  # (engine, trainer dtype) → routing
    distribution: dict[tuple[str, str], DistributionSummary] = field(default_factory=dict)  # (engine, trainer dtype)


def _reference_scores(engine, dtypes: list[str], rollouts: dict[str, list[Rollout]]) -> dict[str, list[Scored]]:
    """The FP32 engine's prefill scores of every dtype's sequences, in one batch: {dtype: scores}."""
    everything = [(r.prompt_ids, r.response_ids) for d in dtypes for r in rollouts[d]]
    scored = iter(engine.score(everything))
    return {d: [next(scored) for _ in rollouts[d]] for d in dtypes}


def run_diagnose(config: DiagnoseConfig, progress: Progress | None = None, *, force: bool = False) -> dict[str, Any]:
    """Diagnose into `config.out`, held for the whole run (`runs.claim`); returns the summary (also written as
    summary.json)."""
    with runs.claim(config.out, force=force):
        return _diagnose(config, progress or Silent())


def _diagnose(config: DiagnoseConfig, progress: Progress) -> dict[str, Any]:
    log = runs.RunLog(config.out, "diagnose", config.to_json())
    summary = log.summary
    stage = log.stage

    with stage("prepare"):
        inputs = prepare_inputs(config)
        summary["skipped_prompts"] = inputs.skipped
        summary["config"]["model_path"] = str(inputs.model_path)
        saved = runs.read_rollouts(config.from_run) if config.from_run else {}
        needed = list(dict.fromkeys([*config.dtypes, REFERENCE_DTYPE]))
        refused = refused_dtypes("vllm", inputs.model_path, needed, config.trust_remote_code)
        summary["refused_dtypes"] = refused
        dtypes = [d for d in config.dtypes if d not in refused]
        if not dtypes or REFERENCE_DTYPE in refused:
            raise EngineError(
                "vllm refuses the dtypes diagnose needs for this model: "
                + "; ".join(f"{d}: {r}" for d, r in refused.items())
            )

    rollouts: dict[str, list[Rollout]] = {}
    engine_side: EngineSide = {}
    engine_rows: dict[str, Rows | str] = {}  # per engine dtype: its whole distribution at planned positions, or why not
    plan = config.distribution_plan(len(inputs.prompt_ids) * config.samples, len(inputs.tokenizer))
    routing = is_moe(inputs.model_path, config.trust_remote_code)  # the engine records its experts as it samples
    fp32_scored = None
    # one engine per dtype; FP32's last, as it scores every dtype's sequences
    for dtype in sorted(dtypes, key=lambda d: d == REFERENCE_DTYPE):
        with stage(f"engine_{dtype}"):
            engine = start_engine(
                "vllm",
                inputs.model_path,
                dtype,
                trust_remote_code=config.trust_remote_code,
                record_routing=routing,
                **config.vllm_options(),
            )
            summary["engine_execution"] = engine.execution  # eager or compiled graphs, as the engine resolved it
            try:
                if dtype in saved:
                    rollouts[dtype] = saved[dtype]
                    engine_rows[dtype] = FROM_SAVED
                else:
                    advance = progress.stage(f"generate vllm {dtype}", len(inputs.prompt_ids) * config.samples)
                    if plan is None:
                        rollouts[dtype] = engine.generate(inputs.prompt_ids, config.samples, config.sampling, advance)
                    else:
                        rollouts[dtype], engine_rows[dtype] = engine.generate_rows(
                            inputs.prompt_ids, config.samples, config.sampling, plan, advance
                        )
                sequences = [(r.prompt_ids, r.response_ids) for r in rollouts[dtype]]
                batched = engine.score(sequences, topk=config.topk)
                alone = engine.score(sequences[: config.alone_sequences], alone=True)
                if dtype == REFERENCE_DTYPE:
                    fp32_scored = _reference_scores(engine, dtypes, rollouts)
            finally:
                engine.close()
            engine_side[dtype] = {"prefill": batched, "alone": alone}
    rollouts = {d: rollouts[d] for d in dtypes}  # the configured order
    runs.write_parquet(config.out / runs.ROLLOUTS, runs.rollouts_frame(rollouts, inputs.tokenizer, config.samples))

    if fp32_scored is None:
        with stage(f"engine_{REFERENCE_DTYPE}"):
            engine = start_engine(
                "vllm",
                inputs.model_path,
                REFERENCE_DTYPE,
                trust_remote_code=config.trust_remote_code,
                **config.vllm_options(),
            )
            try:
                fp32_scored = _reference_scores(engine, dtypes, rollouts)
            finally:
                engine.close()
    for dtype in dtypes:
        engine_side[dtype]["fp32"] = fp32_scored[dtype]

    trainer = _trainer_side(
        config, inputs, rollouts, engine_side, log=log, progress=progress, routing=routing, engine_rows=engine_rows
    )

    with stage("metrics"):
        tokens = _tokens_frame(
            rollouts, engine_side, trainer.scores, tokenizer=inputs.tokenizer, samples=config.samples
        )
        topk = pd.concat(trainer.topk_frames, ignore_index=True)
        runs.write_parquet(config.out / runs.TOKENS, tokens)
        runs.write_parquet(config.out / runs.TOPK, topk)
        components = component_table(tokens, seed=config.sampling.seed)
        summary["diagnosis"] = {
            "components": components,
            "dominant": dominant_components(components),
            "layers": trainer.layers,
            "topk": topk_summary(topk, config.topk),
        }
        routing_gap = None
        if trainer.routes:
            routed = runs.routing_frame(rollouts, trainer.routes, config.samples)
            runs.write_parquet(config.out / runs.ROUTING, routed)
            summary["diagnosis"]["routing"] = agreement_rows(routed, _pair_rows(tokens))
            routing_gap = summary["diagnosis"]["routing"]["gap"]
        summary["recommendation"] = recommend_diagnosis(components, routing_gap)
        if plan is not None:
            unavailable = {dtype: rows for dtype, rows in engine_rows.items() if isinstance(rows, str)}
            compared = {
                (e, t): trainer.distribution[e, t]
                for e in dtypes
                for t in (e, REFERENCE_DTYPE)
                if (e, t) in trainer.distribution
            }
            summary["distribution"] = distribution_record(sum(map(len, plan.values())), compared, unavailable)
    log.finish()
    with stage("report"):
        from mismatch.report import write_report

        write_report(config.out)
    return summary


def _trainer_side(
    config: DiagnoseConfig,
    inputs: Inputs,
    rollouts: dict[str, list[Rollout]],
    engine_side: EngineSide,
    *,
    log: runs.RunLog,
    progress: Progress,
    routing: bool,
    engine_rows: dict[str, Rows | str],
) -> TrainerSide:
    """Trainer scorings: FP32 for every dtype's sequences, each dtype batched and alone, its top-k
    against the engine's, and per layer its error against FP32 and its largest activation; for an
    MoE model whose engine recorded its experts, the trainer's experts in its dtype and in FP32; where
    the engine recorded its whole distribution, the trainer's in its dtype and in FP32 compared with it."""
    dtypes = list(rollouts)
    pad_id = inputs.tokenizer.pad_token_id if inputs.tokenizer.pad_token_id is not None else 0
    probe_rollouts = rollouts[dtypes[0]][: config.layer_sequences]
    side = TrainerSide(scores={d: {} for d in dtypes})
    reference_states: list[list[torch.Tensor]] = []  # the FP32 trainer's, which comes first
    for trainer_dtype in [REFERENCE_DTYPE, *[d for d in dtypes if d != REFERENCE_DTYPE]]:
        with log.stage(f"trainer_{trainer_dtype}"):
            model = load_trainer(inputs.model_path, trainer_dtype, trust_remote_code=config.trust_remote_code)
            with ActivationPeak(model) as watch:
                states = layer_states(model, trainer_dtype, probe_rollouts)
            if trainer_dtype == REFERENCE_DTYPE:
                reference_states = states
            errors = layer_errors(states, reference_states)
            peaks = watch.per_layer()
            side.layers.append(
                {
                    "trainer_dtype": trainer_dtype,
                    "layers": [
                        {
                            "index": i,
                            "name": _layer_name(i, len(errors)),
                            "relative_error": err,
                            "max_abs_activation": peaks.get(i - 1),
                            "fraction_of_fp16_limit": None if peaks.get(i - 1) is None else peaks[i - 1] / FP16_MAX,
                        }
                        for i, err in enumerate(errors)
                    ],
                }
            )
            for dtype in dtypes:
                if (
                    routing
                    and trainer_dtype in (REFERENCE_DTYPE, dtype)
                    and all(r.routed_experts is not None for r in rollouts[dtype])
                ):
                    side.routes[dtype, trainer_dtype] = response_routing(model, rollouts[dtype], pad_id)
                if trainer_dtype == REFERENCE_DTYPE:
                    advance = progress.stage(f"trainer fp32 on {dtype}", len(rollouts[dtype]))
                    side.scores[dtype]["fp32"] = rescore(
                        model, REFERENCE_DTYPE, rollouts[dtype], 1.0, pad_id=pad_id, progress=advance
                    )["logp_trainer"]
                if trainer_dtype in (REFERENCE_DTYPE, dtype) and isinstance(rows := engine_rows.get(dtype), Rows):
                    chunks = distribution_rows(
                        model,
                        trainer_dtype,
                        rollouts[dtype],
                        (rows.request, rows.position),
                        temperature=1.0,
                        pad_id=pad_id,
                    )
                    side.distribution[dtype, trainer_dtype] = compare_rows(
                        rows.logp,
                        chunks,
                        rows.tokens(rollouts[dtype]),
                        rows.prompts(rollouts[dtype]),
                        seed=config.sampling.seed,
                    )
                if trainer_dtype == dtype:
                    advance = progress.stage(f"trainer {dtype}", len(rollouts[dtype]))
                    side.scores[dtype]["batched"] = rescore(
                        model, dtype, rollouts[dtype], 1.0, pad_id=pad_id, progress=advance
                    )["logp_trainer"]
                    side.scores[dtype]["alone"] = score_alone(
                        model, dtype, rollouts[dtype][: config.alone_sequences], pad_id
                    )
                    ids = [seq_id(r.prompt_index, r.sample_index, config.samples) for r in rollouts[dtype]]
                    top = topk_rows(
                        model,
                        dtype,
                        rollouts[dtype],
                        engine=engine_side[dtype]["prefill"],
                        k=config.topk,
                        seq_ids=ids,
                    )
                    side.topk_frames.append(top.assign(engine_dtype=dtype))
            del model
    return side


def _pair_rows(tokens: pd.DataFrame) -> pd.DataFrame:
    """The diagnose columns as a scan's (engine dtype, trainer dtype) rows: μ as sampled against the
    trainer in the dtype and in FP32, what the routing pairs compare."""
    keys = ["engine_dtype", "seq_id", "position"]
    return pd.concat(
        [
            tokens[keys].assign(
                trainer_dtype=tokens["engine_dtype"],
                logp_engine=tokens["logp_engine_decode"],
                logp_trainer=tokens["logp_trainer"],
            ),
            tokens[keys].assign(
                trainer_dtype=REFERENCE_DTYPE,
                logp_engine=tokens["logp_engine_decode"],
                logp_trainer=tokens["logp_trainer_fp32"],
            ),
        ],
        ignore_index=True,
    )


def _layer_name(index: int, count: int) -> str:
    return "embedding" if index == 0 else "logits" if index == count - 1 else f"layer {index - 1}"


def _flat(per_seq, lengths: np.ndarray) -> np.ndarray:
    """Per-sequence values end to end; sequences past the end of `per_seq` (scored alone only up to a
    count) get NaN for each of their `lengths` tokens."""
    values = [np.asarray(x, dtype=np.float64) for x in per_seq]
    return np.concatenate(values + [np.full(n, np.nan) for n in lengths[len(values) :]])


def _tokens_frame(
    rollouts: dict[str, list[Rollout]],
    engine_side: EngineSide,
    trainer_side: dict[str, dict[str, list[np.ndarray]]],
    *,
    tokenizer,
    samples: int,
) -> pd.DataFrame:
    """One row per (engine dtype, sequence, response position), one column per scoring."""
    frames = []
    for dtype, group in rollouts.items():
        lengths = np.array([len(r.response_ids) for r in group])
        frames.append(
            pd.DataFrame(
                {
                    "engine_dtype": dtype,
                    "seq_id": np.repeat([seq_id(r.prompt_index, r.sample_index, samples) for r in group], lengths),
                    "prompt_index": np.repeat([r.prompt_index for r in group], lengths),
                    "position": np.concatenate([np.arange(n) for n in lengths]),
                    "token_id": np.concatenate([r.response_ids for r in group]).astype(np.int64),
                    "logp_engine_decode": _flat((r.logp_engine for r in group), lengths),
                    "logp_engine_prefill": _flat((s.logp for s in engine_side[dtype]["prefill"]), lengths),
                    "logp_engine_alone": _flat((s.logp for s in engine_side[dtype]["alone"]), lengths),
                    "logp_engine_fp32": _flat((s.logp for s in engine_side[dtype]["fp32"]), lengths),
                    "logp_trainer": _flat(trainer_side[dtype]["batched"], lengths),
                    "logp_trainer_alone": _flat(trainer_side[dtype]["alone"], lengths),
                    "logp_trainer_fp32": _flat(trainer_side[dtype]["fp32"], lengths),
                }
            )
        )
    return runs.with_token_text(pd.concat(frames, ignore_index=True), tokenizer)[list(runs.DIAGNOSE_TOKEN_COLUMNS)]


def component_table(tokens: pd.DataFrame, seed: int = 0) -> list[dict]:
    """Each component per engine dtype: k3 with its interval and mean |Δ log p|, from tokens.parquet."""
    rows = []
    for dtype, group in tokens.groupby("engine_dtype", sort=False):
        for name, (reference, compared) in COMPONENTS.items():
            if dtype == REFERENCE_DTYPE and name in PRECISION_ONLY:
                continue
            scored = group.dropna(subset=[reference, compared])  # the alone scorings cover the first sequences only
            m = pair_metrics(
                scored[compared], scored[reference], scored["seq_id"], seed=seed, prompt_ids=scored["prompt_index"]
            )
            rows.append(
                {
                    "name": name,
                    "engine_dtype": dtype,
                    "k3": m["k3"],
                    "k3_ci_low": m["k3_ci_low"],
                    "k3_ci_high": m["k3_ci_high"],
                    "mean_abs_dlogp": float(np.mean(np.abs(scored[compared] - scored[reference]))),
                    "max_abs_dlogp": float(np.max(np.abs(scored[compared] - scored[reference]))),
                    "n_tokens": m["n_tokens"],
                }
            )
    return rows


CLOSE = 0.5  # a second component within this factor of the dominant one is named with it


def dominant_components(components: list[dict]) -> dict[str, dict]:
    """Per engine dtype, the component with the largest k3 (total aside), its k3 divided by the total's,
    and the components close behind it (k3 at least CLOSE × the dominant's).

    The ratio is not a share: k3 estimates a KL divergence, and the KLs of a chain of scorings do not
    add up (each side's rounding alone can exceed the total, where they partly cancel), so it may be
    above 1 and the components' ratios need not sum to 1."""
    dominant = {}
    for dtype in dict.fromkeys(c["engine_dtype"] for c in components):
        mine = [c for c in components if c["engine_dtype"] == dtype]
        total = next(c["k3"] for c in mine if c["name"] == "total")
        ranked = sorted((c for c in mine if c["name"] != "total"), key=lambda c: -c["k3"])
        top = ranked[0]
        close = [c["name"] for c in ranked[1:] if top["k3"] > 0 and c["k3"] >= CLOSE * top["k3"]]
        dominant[dtype] = {
            "name": top["name"],
            "k3": top["k3"],
            "k3_ratio_to_total": top["k3"] / total if total > 0 else None,
            "close": close,
        }
    return dominant


def topk_summary(topk: pd.DataFrame, k: int) -> list[dict]:
    """Per engine dtype, over sampled positions: the share of the engine's top-k also in the
    trainer's top-k, and the total variation between them restricted to the engine's top-k (a
    lower bound of the full distance), with the mass each side puts there."""
    out = []
    for dtype, group in topk.groupby("engine_dtype", sort=False):
        per_position = group.assign(
            p_engine=np.exp(group["logp_engine"]), p_trainer=np.exp(group["logp_trainer"])
        ).groupby(["seq_id", "position"])
        stats = per_position.agg(
            overlap=("in_trainer_topk", "mean"), mass_engine=("p_engine", "sum"), mass_trainer=("p_trainer", "sum")
        )
        tv = per_position.apply(
            lambda g: 0.5 * float(np.abs(g["p_engine"] - g["p_trainer"]).sum()), include_groups=False
        )
        out.append(
            {
                "engine_dtype": dtype,
                "k": k,
                "positions": int(len(stats)),
                "mean_overlap": float(stats["overlap"].mean()),
                "min_overlap": float(stats["overlap"].min()),
                "mean_tv_topk": float(tv.mean()),
                "max_tv_topk": float(tv.max()),
                "mean_mass_engine": float(stats["mass_engine"].mean()),
                "mean_mass_trainer": float(stats["mass_trainer"].mean()),
            }
        )
    return out


ACTIONS = {
    "semantic": "Not precision: engine and trainer compute different things even in FP32. "
    "Compare their model code and settings (attention implementation, logit scaling or softcap, "
    "RoPE / sliding window, tokenizer and chat template) before any dtype change.",
    "engine_precision": "Rounding on the engine side: FP16 in the engine shrinks it "
    "(`mismatch scan` measures by how much with FP16 on both sides).",
    "trainer_precision": "Rounding on the trainer side: FP16 compute with dynamic loss scaling shrinks it "
    "(`mismatch scan` measures by how much with FP16 on both sides).",
    "engine_decode_vs_prefill": "The engine's decode path (KV cache, decode kernels) differs from its prefill: "
    "try eager mode (enforce_eager, no CUDA graphs), another attention backend, "
    "or a KV cache in the model dtype (kv_cache_dtype=auto).",
    "engine_batch": "The engine's batching moves log-probs: where the platform supports it "
    "set VLLM_BATCH_INVARIANT=1, or bound the batch (max_num_seqs).",
    "trainer_batch": "The trainer's own batching noise (padding, micro-batch size), which no engine setting can fix: "
    "keep one micro-batch size for the old-policy and the update passes, prefer padding-free packing, "
    "and use deterministic kernels; FP16 shrinks it too.",
}


def recommend_diagnosis(components: list[dict], routing: list[dict] | None = None) -> Recommendation:
    """The dominant component per engine dtype with its k3 against the total's, and what to do about it;
    router replay too where an MoE model's routing carries most of the gap (`routing` as in a scan)."""
    dominant = dominant_components(components)
    parts: list[str] = []
    actions: list[str] = []
    for dtype, top in dominant.items():
        against = (
            f"{top['k3_ratio_to_total']:.2g}× the total's" if top["k3_ratio_to_total"] is not None else "the total is 0"
        )
        behind = f", with {' and '.join(top['close'])} close behind" if top["close"] else ""
        parts.append(f"{dtype}: {top['name']} dominates (k3 {top['k3']:.2e}, {against}){behind}")
        actions += [ACTIONS[name] for name in [top["name"], *top["close"]] if ACTIONS[name] not in actions]
    verdict: Recommendation = {
        "verdict": "diagnosed",
        "summary": "; ".join(parts) + ".",
        "actions": actions,
        "dominant": {d: t["name"] for d, t in dominant.items()},
    }
    return with_router_replay(verdict, routing or [])
