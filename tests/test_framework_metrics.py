"""Each framework's metric against its own code: the few lines that compute it, transcribed here in torch
(float64) from the file and commit cited, run on synthetic tokens where the definitions part ways (ratios far
from 1, one beyond verl's ±20 clamp, sequences of 1, 3 and 8 tokens)."""

import re

import numpy as np
import pandas as pd
import pytest
import torch

from mismatch.report.markdown import _health_lines
from mismatch.stats import health
from mismatch.stats.corrections import CORRECTIONS, Replay
from mismatch.stats.measures import Measures

# ℓ = log π − log μ per sequence (unequal lengths; 22.0 lies beyond verl's SAFETY_BOUND of 20).
ELL = [[1.5], [-1.2, 0.3, 0.9], [0.05, -0.1, 0.02, 22.0, -0.9, 0.0, 0.4, -2.5]]
LENGTHS = [len(s) for s in ELL]
FLAT = np.concatenate([np.array(s) for s in ELL])
SEQ = np.repeat(np.arange(len(ELL)), LENGTHS)
_BASE = np.random.default_rng(3).uniform(-3.0, -2.6, len(FLAT))
PI = _BASE + np.minimum(FLAT, 0)  # both ≤ 0 (log-probabilities), π − μ = ℓ
MU = _BASE - np.maximum(FLAT, 0)


def padded(values: np.ndarray) -> torch.Tensor:
    """The flat tokens as frameworks batch them: (batch, max length), right-padded with 0."""
    out = torch.zeros(len(ELL), max(LENGTHS), dtype=torch.float64)
    for i, chunk in enumerate(np.split(values, np.cumsum(LENGTHS)[:-1])):
        out[i, : len(chunk)] = torch.from_numpy(chunk)
    return out


OLD, ROLLOUT = padded(PI), padded(MU)  # verl's old_log_prob (the trainer's π) and rollout_log_prob (μ)
MASK = padded(np.ones(len(FLAT)))


def verl_masked_mean(values, mask, axis=None):
    """verl/utils/torch_functional.py masked_sum / masked_mean @ 483b8a009ba3 (v0.9.0)."""
    s = (torch.where(mask.bool(), values, 0.0) * mask).sum(axis=axis)
    return s / (mask.sum(axis=axis) + 1e-8)


def verl_is_metrics(version: str) -> dict[str, float]:
    """verl/trainer/ppo/rollout_corr_helper.py compute_rollout_correction_weights (rollout_is="token",
    rollout_is_threshold=2.0) and compute_is_metrics: v0.9.0 @ 483b8a009ba3 (the same from v0.8.0,
    7aed6b230776, verl #5722) reports on the truncated weights; v0.7.1 @ bec9ef74768d (= v0.7.0) on the raw
    ones, std and ESS on the raw ones clamped to [1/threshold, threshold] (the same at v0.6.1, d62da4950573)."""
    threshold = 2.0
    log_ratio = OLD - ROLLOUT
    log_ratio_safe = torch.clamp(log_ratio, min=-20.0, max=20.0)
    raw_rollout_is_weights = torch.exp(log_ratio_safe) * MASK
    if version == "v0.9.0":
        rollout_is_weights = raw_rollout_is_weights.clamp(max=threshold)
        lower = 0.0
    else:
        rollout_is_weights = raw_rollout_is_weights  # metrics computed BEFORE truncation
        lower = 1.0 / threshold
    metrics = {"rollout_is_mean": verl_masked_mean(rollout_is_weights, MASK).item()}
    weights_for_std = rollout_is_weights.clamp(min=lower, max=threshold)
    mean_clamped = verl_masked_mean(weights_for_std, MASK)
    rollout_is_var = verl_masked_mean(weights_for_std.square(), MASK) - mean_clamped.square()
    metrics["rollout_is_std"] = torch.sqrt(torch.clamp(rollout_is_var, min=0.0)).item()
    weights_for_ess = rollout_is_weights.clamp(min=lower, max=threshold)
    mean_for_ess = verl_masked_mean(weights_for_ess, MASK)
    is_weights_normalized = weights_for_ess / (mean_for_ess + 1e-8)
    metrics["rollout_is_eff_sample_size"] = 1.0 / verl_masked_mean(is_weights_normalized.square(), MASK).item()
    return metrics


def slime_reducers():
    """slime/backends/megatron_utils/cp_utils.py get_sum_of_sample_mean (cp_size 1, one sample per rollout) and
    reduce_train_step_metrics @ a6272da0d4f3 (v0.3.1): the default divides the sum of per-sample means by the
    step's rollout count; --calculate-per-token-loss sums tokens and divides by num_tokens (loss.py
    loss_function: Σ clamp_min(loss_mask.sum(), 1))."""
    loss_masks = [torch.ones(n, dtype=torch.float64) for n in LENGTHS]
    sample_denoms = [m.sum() for m in loss_masks]
    num_tokens = sum(torch.clamp_min(m.sum(), 1) for m in loss_masks)
    step_global_batch_size = len(LENGTHS)

    def sum_of_sample_mean(x):
        return sum(
            (x_i * m).sum() / torch.clamp_min(d, 1)
            for x_i, m, d in zip(x.split(LENGTHS, dim=0), loss_masks, sample_denoms, strict=True)
        )

    def sum_of_token(x):
        return sum((x_i * m).sum() for x_i, m in zip(x.split(LENGTHS, dim=0), loss_masks, strict=True))

    return (
        lambda x: (sum_of_sample_mean(x) / step_global_batch_size).item(),
        lambda x: (sum_of_token(x) / num_tokens).item(),
    )


def by_hand() -> dict[str, float]:
    """Every check's metric, by each framework's own lines."""
    log_probs, rollout_log_probs = torch.from_numpy(PI), torch.from_numpy(MU)
    per_sample, per_token = slime_reducers()
    # slime loss.py policy_loss_function: sum_of_sample_mean((log_probs_to_compare - rollout_log_probs).abs())
    abs_diff = (log_probs - rollout_log_probs).abs()
    # NeMo-RL nemo_rl/algorithms/loss/loss_functions.py ClippedPGLossFn.__call__ and utils.py masked_mean,
    # calculate_kl (k3, no clamps) @ 81aa43dda476 (v0.7.0); one microbatch, global_valid_toks = its tokens
    global_valid_toks = MASK.sum()
    lp_error = torch.abs(ROLLOUT - OLD)
    logr = OLD - ROLLOUT  # calculate_kl(logprobs=generation, logprobs_reference=prev): prev − generation
    # prime-rl src/prime_rl/trainer/rl/loss.py compute_importance_ratio_and_mismatch_kl @ 60bc29547a88 (v0.8.0),
    # train.py: mismatch_kl[mismatch_mask], then utils.py compute_stats: the concatenated tokens' mean
    log_importance_ratio = log_probs - rollout_log_probs
    mismatch_kl = torch.exp(log_importance_ratio) - log_importance_ratio - 1
    # verl verl/utils/debug/metrics.py calculate_debug_metrics and rollout_corr_helper.py compute_offpolicy_metrics
    # @ 483b8a009ba3 (v0.9.0)
    probs_diff = torch.masked_select(torch.abs(torch.exp(OLD) - torch.exp(ROLLOUT)), MASK.bool())
    rho_token = torch.exp(torch.clamp(OLD - ROLLOUT, min=-20.0, max=20.0))
    # TRL trl/trainer/grpo_trainer.py @ 35def3ee000a (v1.9.0): delta = |old − sampling|[mask], its max
    delta = torch.masked_select(torch.abs(OLD - ROLLOUT), MASK.bool())
    v09, v07 = verl_is_metrics("v0.9.0"), verl_is_metrics("v0.7.1")
    return {
        "training/rollout_probs_diff_mean": torch.mean(probs_diff).item(),
        "rollout_corr/kl": verl_masked_mean(ROLLOUT - OLD, MASK).item(),
        "rollout_corr/chi2_token": (verl_masked_mean(rho_token.square(), MASK) - 1.0).item(),
        **{f"rollout_corr/{name}": value for name, value in v09.items()},
        **{f"rollout_corr/{name} (v0.7.x)": value for name, value in v07.items()},
        "train/token_mult_prob_error": (
            torch.sum(torch.exp(lp_error * MASK) * MASK) / (global_valid_toks + 1e-8)
        ).item(),
        "train/gen_kl_error": (torch.sum((torch.exp(logr) - 1 - logr) * MASK) / (global_valid_toks + 1e-8)).item(),
        "mismatch_kl/all/mean": mismatch_kl.mean().item(),
        "train/train_rollout_logprob_abs_diff": per_sample(abs_diff),
        "train/train_rollout_logprob_abs_diff (--calculate-per-token-loss)": per_token(abs_diff),
        "sampling/sampling_logp_difference/max": torch.max(delta).item(),
    }


def test_every_check_matches_its_framework_code():
    ours = {row["metric"]: row["value"] for row in health.evaluate(PI, MU, SEQ)}
    expected = by_hand()
    assert set(ours) == set(expected)
    for metric, value in expected.items():
        assert ours[metric] == pytest.approx(value, rel=1e-12), metric


def test_slime_reduces_per_sample_by_default_and_per_token_with_the_flag():
    rows = {row["metric"]: row["value"] for row in health.evaluate(PI, MU, SEQ)}
    per_sample = rows["train/train_rollout_logprob_abs_diff"]
    pooled = rows["train/train_rollout_logprob_abs_diff (--calculate-per-token-loss)"]
    assert per_sample == pytest.approx((1.5 + 2.4 / 3 + 25.97 / 8) / 3)  # the 1-token sequence weighs a third
    assert pooled == pytest.approx((1.5 + 2.4 + 25.97) / 12)  # 2.489 against 1.849


def test_verl_since_v0_8_reports_on_truncated_weights_and_v0_7_before():
    rows = {row["metric"]: row for row in health.evaluate(PI, MU, SEQ)}
    for name in ("rollout_is_mean", "rollout_is_std", "rollout_is_eff_sample_size"):
        current, old = rows[f"rollout_corr/{name}"], rows[f"rollout_corr/{name} (v0.7.x)"]
        assert abs(current["value"] - old["value"]) > 0.05, name
        assert current["version"].startswith("verl v0.9.0") and old["version"].startswith("verl v0.6.1")
    # v0.7.x: the raw mean carries e^20 from the one token beyond the clamp, and fails; ≥ v0.8.0: every weight ≤ 2
    assert rows["rollout_corr/rollout_is_mean (v0.7.x)"]["status"] == "fail"
    assert (
        rows["rollout_corr/rollout_is_mean"]["value"] <= 2.0 and rows["rollout_corr/rollout_is_mean"]["status"] == "ok"
    )


def verl_geo_rs_keeps(ell: list[float]) -> bool:
    """verl/trainer/ppo/rollout_corr_helper.py compute_rollout_rejection_mask, rollout_rs="seq_mean_k1",
    rollout_rs_threshold="0.999_1.001" (decoupled_geo_rs in verl/trainer/config/algorithm.py) @ 483b8a009ba3."""
    log_ratio = torch.tensor([ell], dtype=torch.float64)
    response_mask = torch.ones_like(log_ratio)
    lower_log, upper_log = np.log(0.999), np.log(1.001)
    token_k1 = -torch.clamp(log_ratio, min=-20.0, max=20.0)
    seq_stat = verl_masked_mean(token_k1, response_mask, axis=-1)
    return bool(((seq_stat >= lower_log) & (seq_stat <= upper_log)).item())


@pytest.mark.parametrize(
    ("ell", "kept"),
    [
        ([0.0030009, -0.0010003], True),  # mean ℓ = +0.0010003: π/μ's geometric mean 1.0010008 > 1.001
        ([-0.0020004, 0.0], False),  # mean ℓ = −0.0010002: π/μ's geometric mean 0.9990003 ≥ 0.999
    ],
)
def test_the_geometric_band_bounds_mu_over_pi_as_verl_applies_it(ell, kept):
    mean = np.mean(ell)
    assert (0.999 <= np.exp(mean) <= 1.001) is not kept  # a band on π/μ would decide the other way
    assert verl_geo_rs_keeps(ell) is kept
    geometric = next(c for c in CORRECTIONS if c.name == "geometric")
    replay = Replay((geometric,))
    replay.add(ell, [0] * len(ell))
    (row,) = replay.result()
    assert row["share_units_zeroed"] == (0.0 if kept else 1.0)
    assert row["band"] == "μ/π ∈ [0.999, 1.001]"


def test_slime_tis_clipfrac_is_a_mean_per_sample():
    """slime loss.py vanilla_tis_function (--tis-clip 2.0, --tis-clip-low 0) @ a6272da0d4f3, reduced by
    sum_of_sample_mean_for_mismatch_metrics."""
    tis = torch.exp(torch.from_numpy(PI) - torch.from_numpy(MU))
    tis_weights = torch.clamp(tis, min=0.0, max=2.0)
    tis_clipfrac = (tis_weights != tis).float().double()
    per_sample, per_token = slime_reducers()
    token_tis = next(c for c in CORRECTIONS if c.name == "token_tis")
    replay = Replay((token_tis,))
    replay.add(FLAT, SEQ)
    (row,) = replay.result()
    assert row["share_tokens_changed_per_seq"] == pytest.approx(per_sample(tis_clipfrac))
    assert row["share_tokens_changed"] == pytest.approx(per_token(tis_clipfrac))
    # π/μ > 2 at e^1.5, e^0.9 and e^22: (1/1 + 1/3 + 1/8) / 3 per sample, 3/12 pooled
    assert row["share_tokens_changed_per_seq"] == pytest.approx((1 + 1 / 3 + 1 / 8) / 3)
    assert row["share_tokens_changed"] == pytest.approx(3 / 12)


def test_every_check_names_its_release_in_the_run_summary_and_summary_md():
    version = re.compile(r"v\d+\.\d+\.\d+ \([0-9a-f]{12}\)")
    assert all(version.search(check.version) for check in health.CHECKS)
    assert {c.framework for c in health.CHECKS} == {"verl", "NeMo-RL", "prime-rl", "slime", "TRL"}
    frame = pd.DataFrame(
        {
            "engine_dtype": "bf16",
            "trainer_dtype": "bf16",
            "seq_id": SEQ + 10,
            "prompt_index": SEQ,
            "logp_engine": MU,
            "logp_trainer": PI,
        }
    )
    measures = Measures()
    measures.add(frame)
    rows = measures.health_rows()
    slime = next(r for r in rows if r["metric"] == "train/train_rollout_logprob_abs_diff")
    assert slime["value"] == pytest.approx(by_hand()["train/train_rollout_logprob_abs_diff"])  # sequences passed
    assert all(version.search(r["version"]) for r in rows)
    markdown = "\n".join(_health_lines(rows))
    assert "| source |" in markdown and "slime v0.3.1 (a6272da0d4f3)" in markdown
