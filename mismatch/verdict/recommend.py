"""Rule-based verdict from the pair table: is the gap an implementation difference, and if it is
precision, does FP16 on both sides fix it?"""

from __future__ import annotations

from typing import Any, TypedDict

from mismatch.stats.audit import AuditRow
from mismatch.stats.corrections import CorrectionRow
from mismatch.stats.drift import DriftRow
from mismatch.stats.health import HealthRow
from mismatch.stats.impact import ImpactResult
from mismatch.stats.metrics import PairRow
from mismatch.verdict.impact import impact_summary

STRONG_CUT = 3.0  # FP16 must cut k3 by at least this factor to be worth a switch
FLOOR_FACTOR = 2.0  # within this factor of the FP32/FP32 gap counts as "at the floor"
SEMANTIC_FLOOR = 1e-6  # FP32 engine vs FP32 trainer above this k3: they compute different things
# (measured at 1e-13 … 1e-11 on thirteen architectures where both libraries agree)

FP16_ACTIONS = [
    "inference engine: dtype=float16 (vLLM: LLM(..., dtype='float16'))",
    "trainer: compute in float16 with FP32 master weights and dynamic loss scaling (torch.amp.GradScaler)",
    "re-run `mismatch scan --dtypes fp16` on the new settings to confirm",
]
CORRECTION_ACTIONS = [
    "keep bf16 on both sides",
    "add token-level truncated importance sampling, weight min(π/μ, C) with C = 2, to the policy loss",
]

ADAPTER_ACTION = (
    "LoRA: sync the adapter merged into the engine's weights (TRL's default with vLLM; verl's layered_summon / "
    "merge) instead of serving it as a LoRA request, or keep the PEFT adapter in the base dtype "
    "(autocast_adapter_dtype=False) to match vLLM's — then re-run `mismatch scan --lora`"
)
ROUTING_DOMINATES = 0.5  # share of Σℓ² carried by tokens whose experts differ between engine and trainer
ROUTER_REPLAY_ACTIONS = [
    "router replay (R3, arXiv 2507.18071): record the engine's experts (vLLM enable_return_routed_experts=True) "
    "and replay them in the trainer's forward — NeMo RL policy.router_replay.enabled=true; verl router replay mode "
    "R3; Megatron-LM moe_enable_routing_replay",
]
SEMANTIC_ACTIONS = [
    "find the difference before changing precision: attention implementation, logit scaling or softcap, RoPE or "
    "sliding window, tokenizer / chat template, model code version",
    "re-run `mismatch scan` once engine and trainer agree in FP32",
]


class _RecommendationRequired(TypedDict):
    verdict: str
    summary: str  # one paragraph with the numbers behind the verdict
    actions: list[str]


class Recommendation(_RecommendationRequired, total=False):
    """summary.json's `recommendation`."""

    k3_cut: float  # switch_to_fp16, fp16_not_enough: BF16's k3 over FP16's
    dominant: dict[str, str]  # diagnose: the dominant component per engine dtype


def _pair(pairs: list[PairRow], engine: str, trainer: str) -> PairRow | None:
    return next((p for p in pairs if p["engine_dtype"] == engine and p["trainer_dtype"] == trainer), None)


def recommend(
    pairs: list[PairRow],
    *,
    fp16_headroom: dict[str, Any] | None = None,
    refused: dict[str, str] | None = None,
    probe: dict[str, Any] | None = None,
    engine: str = "vllm",
    lora: list[dict[str, Any]] | None = None,
    routing: list[dict[str, Any]] | None = None,
    impact: dict[str, ImpactResult] | None = None,
) -> Recommendation:
    """A verdict code, one sentence with the numbers behind it, and the settings to change.

    `fp16_headroom` is the largest |activation| of the FP16 forward against 65504 (ActivationPeak);
    `refused` the dtypes the engine would not run (with its reason); `probe` the semantic probe's
    plan (`prompts`, or why it was `skipped`), whose result is the FP32/FP32 pair; `lora` the
    adapter-applied against merged comparison of a LoRA scan (`lora.adapter_gap`); `routing` the
    MoE routing rows of each pair (`routing.routing_and_gap`, summary.json routing.gap); `impact` the
    gradient impact per engine dtype (summary.json impact), said after the verdict in its own words.
    """
    refused = refused or {}
    probe = probe or {}
    semantic = _pair(pairs, "fp32", "fp32")
    if probe.get("prompts") and semantic and semantic["k3"] > SEMANTIC_FLOOR:
        return {
            "verdict": "implementation_difference",
            "summary": f"Engine and trainer disagree even in FP32 (k3 {semantic['k3']:.2e} over {semantic['n_seqs']} "
            f"sequences, π/μ from {semantic['min_ratio']:.3f} to {semantic['max_ratio']:.3f}): the gap is an "
            "implementation difference between them, not precision, and no dtype change is recommended on this "
            "evidence.",
            "actions": SEMANTIC_ACTIONS,
        }
    verdict = _precision_verdict(pairs, fp16_headroom, refused, engine)
    if probe.get("skipped"):
        verdict["summary"] += (
            f" (Semantic probe skipped: {probe['skipped']}. This verdict rests on the precision pairs alone and "
            "cannot rule out an implementation difference between engine and trainer.)"
        )
    verdict = with_router_replay(_with_adapter_path(verdict, lora or []), routing or [])
    if impact:
        verdict["summary"] += " " + impact_summary(impact)
    return verdict


def with_router_replay(verdict: Recommendation, gap: list[dict[str, Any]]) -> Recommendation:
    """An MoE model: name router replay where the tokens routed to other experts by engine and
    trainer carry most of the gap (ROUTING_DOMINATES of Σℓ², on a same-dtype pair): a dtype change makes
    such flips rarer, never absent."""
    dominated = [
        g for g in gap if g["engine_dtype"] == g["trainer_dtype"] != "fp32" and g["share_sq"] >= ROUTING_DOMINATES
    ]
    if not dominated:
        return verdict
    numbers = "; ".join(
        f"{g['engine_dtype']}: {100 * g['share_tokens']:.2g}% of tokens are routed to other experts and carry "
        f"{100 * g['share_sq']:.0f}% of Σℓ² (mean |ℓ| {g['mean_abs_differs']:.2g} against {g['mean_abs_same']:.2g})"
        for g in dominated
    )
    return verdict | {
        "summary": verdict["summary"] + f" Routing dominates the gap of this MoE model ({numbers}): a dtype change "
        "makes such flips rarer but cannot remove them; replay the engine's routing in the trainer.",
        "actions": [*verdict["actions"], *ROUTER_REPLAY_ACTIONS],
    }


def _with_adapter_path(verdict: Recommendation, comparison: list[dict[str, Any]]) -> Recommendation:
    """A LoRA scan: say where applying the adapter (vLLM LoRA request against PEFT's FP32 adapter)
    measurably adds mismatch over the merged model, on the pairs with the same dtype on both sides."""
    adds = [c for c in comparison if c["engine_dtype"] == c["trainer_dtype"] != "fp32" and c["adapter_path"] == "adds"]
    if not adds:
        return verdict
    numbers = "; ".join(
        f"{c['engine_dtype']}: k3 {c['k3_lora']:.2e} applied against {c['k3_merged']:.2e} merged ({c['k3_ratio']:.2g}×)"
        for c in adds
    )
    return verdict | {
        "summary": verdict["summary"] + f" The LoRA adapter path adds mismatch of its own ({numbers}).",
        "actions": [*verdict["actions"], ADAPTER_ACTION],
    }


def _precision_verdict(
    pairs: list[PairRow], fp16_headroom: dict[str, Any] | None, refused: dict[str, str], engine: str
) -> Recommendation:
    bf16 = _pair(pairs, "bf16", "bf16")
    fp16 = _pair(pairs, "fp16", "fp16")
    fp32 = _pair(pairs, "fp32", "fp32")
    if "fp16" in refused:
        return _fp16_unavailable(pairs, fp16_headroom, refused["fp16"], engine)
    nonfinite = sum(p["n_nonfinite"] for p in pairs if "fp16" in (p["engine_dtype"], p["trainer_dtype"]))
    overflow = fp16_headroom is not None and fp16_headroom["overflow"]
    if nonfinite or overflow:
        evidence = [f"{nonfinite} token log-probabilities were not finite in FP16"] if nonfinite else []
        if fp16_headroom is not None and overflow:
            evidence.append(f"activations reached the FP16 limit 65504 (in {fp16_headroom['module']})")
        return {
            "verdict": "fp16_unsafe",
            "summary": f"FP16 is not safe for this model: {' and '.join(evidence)} (overflow); "
            "stay on BF16 and correct the mismatch with importance sampling.",
            "actions": CORRECTION_ACTIONS,
        }
    if bf16 and fp32 and bf16["k3"] <= FLOOR_FACTOR * fp32["k3"]:
        return {
            "verdict": "at_floor",
            "summary": f"The BF16 gap (k3 {bf16['k3']:.2e}) is already at the FP32 floor (k3 {fp32['k3']:.2e}): "
            "precision is not what separates engine and trainer here; no dtype change needed.",
            "actions": ["keep the current dtypes"],
        }
    if bf16 and fp16:
        cut = bf16["k3"] / fp16["k3"] if fp16["k3"] > 0 else float("inf")
        dp_cut = bf16["mean_abs_dp"] / fp16["mean_abs_dp"] if fp16["mean_abs_dp"] > 0 else float("inf")
        numbers = f"k3 {bf16['k3']:.2e} → {fp16['k3']:.2e} ({cut:.1f}× lower), mean |Δp| {dp_cut:.1f}× lower"
        if fp16_headroom:
            numbers += (
                f"; largest FP16 activation {fp16_headroom['max_abs_activation']:.3g} "
                f"({100 * fp16_headroom['fraction_of_limit']:.2g}% of 65504)"
            )
        if cut >= STRONG_CUT:
            return {
                "verdict": "switch_to_fp16",
                "summary": f"Switch both sides to FP16 with dynamic loss scaling: FP16 cuts the mismatch, {numbers}.",
                "actions": FP16_ACTIONS,
                "k3_cut": cut,
            }
        return {
            "verdict": "fp16_not_enough",
            "summary": f"FP16 does not cut the mismatch enough to switch ({numbers}, below {STRONG_CUT:.0f}×): "
            "keep BF16 and correct with token-level truncated importance sampling.",
            "actions": CORRECTION_ACTIONS,
            "k3_cut": cut,
        }
    scanned = ", ".join(f"{p['engine_dtype']}/{p['trainer_dtype']} k3 {p['k3']:.2e}" for p in pairs)
    return {
        "verdict": "incomplete",
        "summary": f"Scanned {scanned}; scan with --dtypes bf16,fp16 to see whether FP16 closes the gap.",
        "actions": ["mismatch scan --dtypes bf16,fp16"],
    }


def _fp16_unavailable(
    pairs: list[PairRow], fp16_headroom: dict[str, Any] | None, reason: str, engine: str
) -> Recommendation:
    """The engine will not run FP16: say so, and what the trainer side in FP16 showed."""
    evidence = []
    trainer_fp16 = _pair(pairs, "bf16", "fp16")
    trainer_bf16 = _pair(pairs, "bf16", "bf16")
    if trainer_fp16 and trainer_bf16:
        evidence.append(
            f"against the BF16 engine an FP16 trainer has k3 {trainer_fp16['k3']:.2e}, "
            f"a BF16 trainer {trainer_bf16['k3']:.2e}"
        )
    if fp16_headroom:
        if fp16_headroom["overflow"]:
            evidence.append(f"FP16 activations overflow (in {fp16_headroom['module']})")
        else:
            evidence.append(f"the largest FP16 activation is {100 * fp16_headroom['fraction_of_limit']:.2g}% of 65504")
    return {
        "verdict": "fp16_unavailable",
        "summary": f"FP16 is unavailable in {engine} for this model ({reason}); on the trainer side "
        f"{'; '.join(evidence) or 'FP16 was not measured'}. "
        "Keep BF16 and correct the mismatch with importance sampling.",
        "actions": CORRECTION_ACTIONS,
    }


def recommend_run(
    pairs: list[PairRow],
    *,
    health: list[HealthRow],
    audit: list[AuditRow],
    drift: list[DriftRow],
    corrections: list[CorrectionRow],
) -> Recommendation:
    """The verdict on a user's run: a setup bug first (no correction fixes one), then the
    frameworks' health checks on the first pair (the dump's own π, else the first rescoring)."""
    bugs = [a for a in audit if a["status"] == "fail"]
    if bugs:
        return {
            "verdict": "setup_bug",
            "summary": "The log-probs carry the fingerprint of a setup bug "
            f"({', '.join(a['check'] for a in bugs)}), not of precision: fix it before reading the gap; "
            "no correction fixes it.",
            "actions": [f"{a['check']} ({a['pair']}): {a['detail']}" for a in bugs],
        }
    first = pairs[0]
    name = f"{first['engine_dtype']}→{first['trainer_dtype']}"
    flagged = [h for h in health if h["pair"] == name and h["status"] in ("warn", "fail")]
    numbers = (
        f"k3 {first['k3']:.2e}, mean |Δp| {first['mean_abs_dp']:.2e}, "
        f"π/μ from {first['min_ratio']:.3g} to {first['max_ratio']:.3g}"
    )
    departs = next(
        (d for d in drift if d["pair"] == name and d["metric"] == "k3" and d["departs_at"] is not None), None
    )
    drift_action = (
        [
            f"k3 departs from its start at step {departs['departs_at']} (×{departs['trend']:.3g} over the run): "
            "the gap grows as the policy trains"
        ]
        if departs
        else []
    )
    if not flagged:
        return {
            "verdict": "healthy",
            "summary": f"This run's gap ({name}: {numbers}) passes every framework health check replayed here.",
            "actions": ["keep the current settings", *drift_action],
        }
    binding = [c for c in corrections if c["pair"] == name and c["share_tokens_changed"] > 0]
    correction_action = (
        "what each correction would do at the threshold used (see the correction table): "
        + "; ".join(
            f"{c['correction']} {c['band']} changes {100 * c['share_tokens_changed']:.2g}% of tokens, "
            f"ESS {c['ess_before']:.2f} → {c['ess_after']:.2f}"
            for c in binding
        )
        if binding
        else "no replayed correction changes a token at the threshold used "
        f"(π/μ stays within [{first['min_ratio']:.3g}, {first['max_ratio']:.3g}])"
    )
    failed = sum(h["status"] == "fail" for h in flagged)
    summary = (
        f"This run's gap ({name}: {numbers}) is flagged by {len(flagged)} framework health check(s) "
        f"({failed} failed, {len(flagged) - failed} warned): "
        + ", ".join(f"{h['framework']} {h['metric']} {h['value']:.3g} ({h['threshold']})" for h in flagged)
        + "."
    )
    if "fp16" in (first["engine_dtype"], first["trainer_dtype"]):  # FP16 already: precision's own fix is in place
        return {
            "verdict": "gap_in_fp16",
            "summary": summary + " This pair already runs in FP16: look for what else separates engine and trainer "
            "(mismatch diagnose), or correct it.",
            "actions": [
                "find the component: mismatch diagnose --model MODEL --dtypes fp16",
                correction_action,
                *drift_action,
            ],
        }
    return {
        "verdict": "gap",
        "summary": summary + " In the paper (arXiv 2510.26788; not measured here) FP16 on both sides cut such a gap "
        "by an order of magnitude or more.",
        "actions": [
            "measure what FP16 does for this model: mismatch scan --model MODEL --dtypes bf16,fp16",
            *FP16_ACTIONS[:2],
            correction_action,
            *drift_action,
        ],
    }
