"""The training validation's statistics (`mismatch.stats.validation`) against hand computation."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mismatch.stats.validation import (
    ONE_SEED,
    final_window,
    k3_clusters,
    paired_difference,
    ratio_variance,
    step0_check,
    step_bands,
    t_interval,
    validate,
    welch_difference_ci,
)

T_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom
T_1 = 12.706204736174707  # … 1 degree of freedom


@pytest.mark.parametrize(
    "steps, window", [(30, range(24, 30)), (20, range(15, 20)), (3, range(0, 3)), (100, range(80, 100))]
)
def test_the_final_window_is_the_last_max_5_or_a_fifth_of_the_steps(steps, window):
    assert final_window(steps) == window


def test_t_interval_by_hand():
    interval = t_interval([1.0, 2.0, 3.0])  # mean 2, s = 1
    half = T_2 * 1 / math.sqrt(3)
    assert interval == pytest.approx({"mean": 2.0, "low": 2 - half, "high": 2 + half, "n": 3})
    one = t_interval([5.0])
    assert one["mean"] == 5.0 and math.isnan(one["low"]) and math.isnan(one["high"]) and one["n"] == 1


def test_paired_difference_is_established_only_when_the_interval_excludes_zero():
    bf16 = {0: 0.10, 1: 0.20, 2: 0.30}
    wide = paired_difference("accuracy", ("bf16", bf16), ("fp16", {0: 0.30, 1: 0.30, 2: 0.60}))
    half = T_2 * 0.1 / math.sqrt(3)  # differences 0.2, 0.1, 0.3: s = 0.1
    assert wide["per_seed"] == pytest.approx([0.2, 0.1, 0.3])
    assert (wide["estimate"], wide["low"], wide["high"]) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert wide["low"] < 0 and wide["established"] is False
    assert wide["statement"] == "not established: the 95% interval contains 0"
    assert (wide["first_mean"], wide["second_mean"]) == pytest.approx((0.2, 0.4))

    tight = paired_difference("accuracy", ("bf16", bf16), ("fp16", {0: 0.30, 1: 0.35, 2: 0.55}))
    half = T_2 * 0.05 / math.sqrt(3)  # differences 0.2, 0.15, 0.25: s = 0.05
    assert (tight["low"], tight["high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert tight["established"] is True and tight["statement"].startswith("established")


def test_k3_is_compared_as_a_ratio_on_the_log_scale():
    diff = paired_difference("k3", ("bf16", {0: 1e-3, 1: 2e-3}), ("fp16", {0: 1e-4, 1: 1e-4}))
    logs = [math.log(0.1), math.log(0.05)]
    mean = sum(logs) / 2
    half = T_1 * abs(logs[0] - logs[1]) / math.sqrt(2) / math.sqrt(2)
    assert diff["scale"] == "ratio"
    assert diff["estimate"] == pytest.approx(math.sqrt(0.1 * 0.05))
    assert (diff["low"], diff["high"]) == pytest.approx((math.exp(mean - half), math.exp(mean + half)))
    assert diff["established"] is False and "contains 1" in diff["statement"]
    assert diff["first_mean"] == pytest.approx(math.sqrt(2e-6))  # geometric mean over seeds


def test_one_seed_gives_a_difference_without_an_interval():
    diff = paired_difference("reward_mean", ("bf16", {7: 0.1}), ("fp16", {7: 0.4}))
    assert diff["estimate"] == pytest.approx(0.3) and math.isnan(diff["low"]) and math.isnan(diff["high"])
    assert diff["established"] is None and diff["statement"] == ONE_SEED


def run(steps: int, reward: list[float], k3: float = 1e-3) -> pd.DataFrame:
    return pd.DataFrame(
        {"step": range(steps), "reward_mean": reward, "accuracy": [r / 2 for r in reward], "k3": [k3] * steps}
    )


def test_validate_pairs_seeds_and_leaves_out_a_run_that_missed_the_window():
    steps = {
        (0, "bf16"): run(6, [0, 0, 0, 0, 0, 0.6]),  # window: steps 1..5 (the last 5 of 6)
        (0, "fp16"): run(6, [0, 1, 1, 1, 1, 1], k3=1e-5),
        (1, "bf16"): run(6, [0.5] * 6),
        (1, "fp16"): run(6, [0.7] * 6, k3=1e-5),
        (2, "bf16"): run(6, [0.5] * 6),
        (2, "fp16"): run(3, [0.7] * 3, k3=1e-5),  # interrupted: not through the window
    }
    result = validate(steps, 6, ["bf16", "fp16"])
    assert result["window"] == [1, 5] and result["seeds"] == [0, 1, 2]
    by_run = {(r["seed"], r["dtype"]): r for r in result["runs"]}
    assert by_run[0, "bf16"]["reward_mean"] == pytest.approx(0.12) and by_run[0, "fp16"]["accuracy"] == 0.5
    assert math.isnan(by_run[2, "fp16"]["reward_mean"]) and by_run[2, "fp16"]["steps_done"] == 3
    reward, accuracy, k3 = result["differences"]
    assert [d["metric"] for d in result["differences"]] == ["reward_mean", "accuracy", "k3"]
    assert reward["seeds"] == [0, 1] and reward["per_seed"] == pytest.approx([0.88, 0.2])
    assert accuracy["estimate"] == pytest.approx((0.44 + 0.1) / 2)
    assert k3["estimate"] == pytest.approx(1e-2) and k3["established"] is True  # the same ratio at both seeds: s ≈ 0


def test_step_bands_are_t_intervals_per_step_and_geometric_on_the_log_scale():
    frames = [
        pd.DataFrame({"step": [0, 1], "k3": [1e-3, 1e-2], "accuracy": [0.1, 0.2]}),
        pd.DataFrame({"step": [0, 1], "k3": [1e-1, 1e-2], "accuracy": [0.3, 0.2]}),
        pd.DataFrame({"step": [0], "k3": [1e-2], "accuracy": [0.2]}),
    ]
    accuracy = step_bands(frames, "accuracy")
    half = T_2 * 0.1 / math.sqrt(3)
    assert accuracy["n"].tolist() == [3, 2]
    assert accuracy.loc[0, ["mean", "low", "high"]].tolist() == pytest.approx([0.2, 0.2 - half, 0.2 + half])
    assert accuracy.loc[1, ["low", "high"]].tolist() == pytest.approx([0.2, 0.2])  # two equal values: s = 0
    k3 = step_bands(frames, "k3", log=True)
    log_half = T_2 * math.log(10) / math.sqrt(3)  # log10 k3 = −3, −1, −2: s = ln 10 on the natural log scale
    assert k3.loc[0, ["mean", "low", "high"]].tolist() == pytest.approx(
        [1e-2, 1e-2 * math.exp(-log_half), 1e-2 * math.exp(log_half)]
    )


def test_k3_clusters_sum_the_finite_k3_terms_per_prompt():
    trainer = np.log([0.2, 0.5, 0.5, 0.3])
    engine = np.log([0.1, 0.5, 0.3, 0.3])
    engine[2] = -np.inf  # the third token: left out, as PairStats leaves it out
    sums = k3_clusters(trainer, engine, [4, 4, 9, 9])
    assert sums["totals"] == pytest.approx([1 - math.log(2), 0.0])  # ℓ = log 2: e^ℓ − 1 − ℓ
    assert sums["counts"].tolist() == [2, 1]


def test_welch_interval_of_the_difference_by_hand():
    first = {"totals": np.array([1.0, 3.0]), "counts": np.array([1.0, 1.0])}  # mean 2; residuals ±1: V = 2/(2·1) = 1
    second = {"totals": np.array([4.0, 8.0, 6.0]), "counts": np.array([2.0, 2.0, 2.0])}  # mean 3; V = 8/(3·2)/2² = 1/3
    assert ratio_variance(first) == pytest.approx(1.0) and ratio_variance(second) == pytest.approx(1 / 3)
    dof = (4 / 3) ** 2 / (1 / 1 + (1 / 3) ** 2 / 2)  # Welch–Satterthwaite: 32/19
    half = stats.t.ppf(0.975, dof) * math.sqrt(4 / 3)
    assert welch_difference_ci(first, second) == pytest.approx((1 - half, 1 + half))
    check = step0_check("bf16", first, second)
    assert (check["train_k3"], check["scan_k3"], check["difference"]) == pytest.approx((2.0, 3.0, 1.0))
    assert check["agrees"] is True  # the interval 1 ± 11.6 contains 0


def test_constant_clusters_give_the_difference_itself_and_one_prompt_no_interval():
    first = {"totals": np.array([1.0, 2.0]), "counts": np.array([10.0, 20.0])}  # every prompt: mean 0.1
    second = {"totals": np.array([3.0, 6.0, 0.3]), "counts": np.array([10.0, 20.0, 1.0])}  # 0.3
    assert welch_difference_ci(first, second) == pytest.approx((0.2, 0.2))
    assert step0_check("bf16", first, second)["agrees"] is False
    one = {"totals": np.array([1.0]), "counts": np.array([10.0])}
    assert all(math.isnan(end) for end in welch_difference_ci(one, second))


def cluster_samples(rng, prompts: int, shape: float):
    counts = rng.integers(20, 60, size=prompts).astype(np.float64)
    return {"totals": rng.gamma(shape, 0.01, size=prompts) * counts, "counts": counts}


def test_two_samples_of_the_same_distribution_agree_in_about_95_percent_of_checks():
    """8 prompts a side, skewed per-prompt k3: Welch's interval covers the true difference 0 in 92–99% of
    400 pairs (the percentile bootstrap of each side, resampled independently, covers ~88%)."""
    rng = np.random.default_rng(3)
    agreed = [
        step0_check("bf16", cluster_samples(rng, 8, 2.0), cluster_samples(rng, 8, 2.0))["agrees"] for _ in range(400)
    ]
    assert 0.92 <= np.mean(agreed) <= 0.99
