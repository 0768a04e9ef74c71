"""Ready-to-paste settings per framework for each verdict, and our metrics' names elsewhere.

Keys were read from each project's source (vLLM config/model.py; verl trainer configs and
rollout_corr_helper.py; TRL grpo_config.py; OpenRLHF CLI; oat / Precision-RL scripts). Where a
framework renamed a key across releases the note says which generation the snippet uses.
"""

from __future__ import annotations

FP16 = [
    {
        "name": "vLLM",
        "snippet": 'LLM(model=MODEL, dtype="float16", logprobs_mode="processed_logprobs")\n# or: vllm serve MODEL --dtype float16 --logprobs-mode processed_logprobs',
        "note": "dtype='auto' keeps a BF16 checkpoint in BF16: set float16 explicitly.",
    },
    {
        "name": "verl",
        "snippet": "actor_rollout_ref.actor.fsdp_config.dtype=float16 \\\nactor_rollout_ref.ref.fsdp_config.dtype=float16 \\\nactor_rollout_ref.rollout.dtype=float16 \\\nactor_rollout_ref.rollout.calculate_log_probs=True",
        "note": "An FP16 actor dtype turns on verl's ShardedGradScaler (dynamic loss scaling); do not also set mixed_precision.param_dtype=bf16. "
        "Precision-RL's patch for older verl spells it actor_rollout_ref.actor.dtype=float16.",
    },
    {
        "name": "TRL (GRPOTrainer)",
        "snippet": 'GRPOConfig(..., fp16=True, bf16=False, model_init_kwargs={"dtype": "float32"})\n# vLLM side (server mode): trl vllm-serve --model MODEL --dtype float16',
        "note": "In colocate mode TRL passes no dtype to vLLM (it follows the checkpoint): use server mode or an FP16 checkpoint.",
    },
    {
        "name": "OpenRLHF",
        "snippet": "--ds.param_dtype fp16   # older releases: --param_dtype fp16",
        "note": "OpenRLHF creates its vLLM engines with dtype='bfloat16' hard-coded: FP16 on the rollout side needs a patch there.",
    },
    {
        "name": "Oat",
        "snippet": "--no-bf16 --fp16",
        "note": "bf16 defaults to on and wins, hence --no-bf16; both vLLM and DeepSpeed (dynamic loss scaling) switch to FP16.",
    },
]

CORRECTION = [
    {
        "name": "verl",
        "snippet": "actor_rollout_ref.rollout.calculate_log_probs=True \\\nalgorithm.rollout_correction.rollout_is=token \\\nalgorithm.rollout_correction.rollout_is_threshold=2.0",
        "note": "Token TIS, C = 2 (weight min(π_old/μ, 2)). Releases before rollout_correction: algorithm.rollout_is=true "
        "algorithm.rollout_is_level=token algorithm.rollout_is_mode=truncate algorithm.rollout_is_threshold=2.0; "
        "earlier still: actor_rollout_ref.actor.tis_imp_ratio_cap=2. Sequence MIS instead: rollout_is_level=sequence rollout_is_mode=mask rollout_is_threshold=10.",
    },
    {
        "name": "TRL (GRPOTrainer)",
        "snippet": 'GRPOConfig(..., vllm_importance_sampling_correction=True,\n           vllm_importance_sampling_mode="token_truncate",\n           vllm_importance_sampling_cap=2.0)',
        "note": "TRL's default mode is sequence_mask (cap 3.0). Newer releases name the cap vllm_importance_sampling_clip_max.",
    },
    {
        "name": "OpenRLHF",
        "snippet": "--algo.advantage.is_correction_enable \\\n--algo.advantage.is_correction_type tis \\\n--algo.advantage.is_correction_threshold 0 2",
        "note": "Older flat flags: --enable_vllm_is_correction --vllm_is_truncated_threshold 2.",
    },
    {
        "name": "Oat",
        "snippet": "--tis_c 2",
        "note": "On by default with C = 2 in Oat's PPO. Sequence MIS (Precision-RL): --tis_c None --ppo_use_seq_is --seq_is_clip_max 10.",
    },
]

SETTINGS = {"switch_to_fp16": FP16, "fp16_not_enough": CORRECTION, "fp16_unsafe": CORRECTION}


def settings_for(verdict: str) -> list[dict]:
    """The framework snippets for a verdict; none when nothing should change."""
    return SETTINGS.get(verdict, [])


METRIC_NOTES = [
    {"name": "k1", "definition": "mean(−ℓ) = mean(log μ − log π)", "verl": "rollout_corr/kl (older: mismatch/mismatch_kl)", "trl": "—"},
    {"name": "k2", "definition": "mean(ℓ²/2)", "verl": "—", "trl": "—"},
    {"name": "k3", "definition": "mean(e^ℓ − 1 − ℓ), unbiased KL[μ‖π]", "verl": "rollout_corr/k3_kl (older: mismatch/mismatch_k3_kl)", "trl": "—"},
    {"name": "chi2_token", "definition": "mean(e^{2ℓ}) − 1", "verl": "rollout_corr/chi2_token", "trl": "—"},
    {"name": "mean_abs_dp", "definition": "mean |π − μ| (probabilities)", "verl": "training/rollout_probs_diff_mean", "trl": "— (sampling/sampling_logp_difference/mean is mean |ℓ|)"},
    {"name": "max_abs_dp", "definition": "max |π − μ|", "verl": "training/rollout_probs_diff_max", "trl": "— (sampling/sampling_logp_difference/max is max |ℓ|)"},
    {"name": "min_ratio / max_ratio", "definition": "min / max of π/μ", "verl": "rollout_corr/rollout_is_min / _max (raw, when rollout_is is set)", "trl": "sampling/importance_sampling_ratio/min / max (after truncation)"},
    {"name": "frac_outside_2", "definition": "share of tokens with π/μ outside [½, 2]", "verl": "—", "trl": "—"},
    {"name": "seq_kl", "definition": "mean over sequences of Σ(−ℓ)", "verl": "— (≈ rollout_corr/kl × mean length)", "trl": "—"},
    {"name": "seq_slope_per_1k", "definition": "slope of Σℓ against length, per 1000 tokens", "verl": "—", "trl": "—"},
    {"name": "log_ppl_diff", "definition": "mean over sequences of (mean log μ − mean log π)", "verl": "rollout_corr/log_ppl_diff", "trl": "—"},
]
