"""Exact divergences of whole distributions against values computed by hand, and the sampled-token k3
against them."""

import math

import numpy as np
import pytest

from mismatch.stats import distribution as d
from mismatch.stats.metrics import k3_terms

LN2 = math.log(2)
INF = np.inf


def logs(*rows) -> np.ndarray:
    """Rows of probabilities → log rows, −inf at the zeros."""
    probs = np.array(rows, dtype=np.float64)
    out = np.full(probs.shape, -INF)
    out[probs > 0] = np.log(probs[probs > 0])
    return out


def test_exact_kl_both_ways_and_tv_of_hand_built_distributions():
    mu = logs([0.5, 0.25, 0.25], [0.8, 0.1, 0.1])
    pi = logs([0.25, 0.5, 0.25], [0.4, 0.4, 0.2])
    out = d.divergences(mu, pi)
    # row 0: 0.5 ln2 + 0.25 ln(1/2) + 0 = 0.25 ln2 both ways; row 1: 0.8 ln2 − 0.1 ln4 − 0.1 ln2 = 0.5 ln2,
    # and 0.4 ln(1/2) + 0.4 ln4 + 0.2 ln2 = 0.6 ln2
    assert out.kl_engine_trainer == pytest.approx([0.25 * LN2, 0.5 * LN2], abs=1e-12)
    assert out.kl_trainer_engine == pytest.approx([0.25 * LN2, 0.6 * LN2], abs=1e-12)
    assert out.tv == pytest.approx([0.25, 0.4], abs=1e-12)
    # no nucleus: the shared support is everything, nothing is outside, the restricted KLs are the KLs
    assert out.kl_engine_trainer_shared == pytest.approx(out.kl_engine_trainer, abs=1e-12)
    assert out.kl_trainer_engine_shared == pytest.approx(out.kl_trainer_engine, abs=1e-12)
    assert out.engine_mass_outside.tolist() == [0.0, 0.0]
    assert out.trainer_mass_outside.tolist() == [0.0, 0.0]
    assert out.k3_expected == pytest.approx(out.kl_engine_trainer, abs=1e-12)
    assert out.same_support.all()


def test_float32_rows_are_renormalised_and_a_shifted_row_changes_nothing():
    mu = logs([0.5, 0.25, 0.25])
    pi = logs([0.25, 0.5, 0.25])
    shifted = d.divergences((mu + 3.0).astype(np.float32), (pi - 1.5).astype(np.float32))
    assert shifted.kl_engine_trainer == pytest.approx([0.25 * LN2], rel=1e-6)
    assert shifted.tv == pytest.approx([0.25], rel=1e-6)


def test_nucleus_rows_give_the_kl_on_the_shared_support_and_the_mass_outside():
    # μ's nucleus {0, 1, 2}, π's {0, 1, 3}: S = {0, 1}, μ(S) = 0.8, π(S) = 0.7
    mu = logs([0.5, 0.3, 0.2, 0.0])
    pi = logs([0.4, 0.3, 0.0, 0.3])
    out = d.divergences(mu, pi)
    assert out.kl_engine_trainer.tolist() == [INF]
    assert out.kl_trainer_engine.tolist() == [INF]
    assert out.engine_mass_outside == pytest.approx([0.2], abs=1e-12)
    assert out.trainer_mass_outside == pytest.approx([0.3], abs=1e-12)
    assert out.tv == pytest.approx([0.5 * (0.1 + 0.0 + 0.2 + 0.3)], abs=1e-12)
    # μ_S = [5/8, 3/8], π_S = [4/7, 3/7]
    forward = 5 / 8 * math.log((5 / 8) / (4 / 7)) + 3 / 8 * math.log((3 / 8) / (3 / 7))
    reverse = 4 / 7 * math.log((4 / 7) / (5 / 8)) + 3 / 7 * math.log((3 / 7) / (3 / 8))
    assert out.kl_engine_trainer_shared == pytest.approx([forward], abs=1e-12)
    assert out.kl_trainer_engine_shared == pytest.approx([reverse], abs=1e-12)
    # E_μ[r − 1 − ln r | token in S], r = π/μ as given: (0.5 (0.8 − 1 − ln 0.8) + 0.3 · 0) / 0.8 …
    expected = 0.5 * (0.8 - 1 - math.log(0.8)) / 0.8
    assert out.k3_expected == pytest.approx([expected], abs=1e-12)
    # … which is KL[μ_S‖π_S] + ρ − 1 − ln ρ with ρ = π(S)/μ(S) = 7/8
    assert expected == pytest.approx(forward + 7 / 8 - 1 - math.log(7 / 8), abs=1e-12)
    assert not out.same_support.any()


def test_one_sided_nucleus_keeps_the_other_kl_finite_with_the_mass_term():
    # π's nucleus {0, 1}; μ full: KL[μ‖π] = ∞, KL[π‖μ] = 0.5 ln(0.5/0.5) + 0.5 ln(0.5/0.3)
    out = d.divergences(logs([0.5, 0.3, 0.2]), logs([0.5, 0.5, 0.0]))
    assert out.kl_engine_trainer.tolist() == [INF]
    assert out.kl_trainer_engine == pytest.approx([0.5 * math.log(5 / 3)], abs=1e-12)
    assert out.engine_mass_outside == pytest.approx([0.2], abs=1e-12)
    assert out.trainer_mass_outside.tolist() == [0.0]


def test_disjoint_nuclei_have_no_restricted_kl():
    out = d.divergences(logs([1.0, 0.0, 0.0]), logs([0.0, 1.0, 0.0]))
    assert np.isnan(out.kl_engine_trainer_shared).all()
    assert np.isnan(out.k3_expected).all()
    assert out.tv.tolist() == [1.0]
    assert out.engine_mass_outside.tolist() == [1.0]
    assert out.trainer_mass_outside.tolist() == [1.0]


def test_a_token_far_down_mu_does_not_overflow():
    # μ gives token 1 log-probability −800, π gives it −10: ℓ = 790 would overflow exp
    mu = np.array([[0.0, -800.0]])
    pi = np.array([[math.log1p(-math.exp(-10)), -10.0]])
    out = d.divergences(mu, pi)
    # KL[μ‖π] = −ln(1 − e^−10) + e^−800·(…) ≈ e^−10 + e^−20/2
    assert out.kl_engine_trainer == pytest.approx([-math.log1p(-math.exp(-10))], rel=1e-9)
    assert np.isfinite(out.kl_trainer_engine).all()


def test_join_keeps_the_chunks_in_order():
    first = d.divergences(logs([0.5, 0.25, 0.25]), logs([0.25, 0.5, 0.25]))
    second = d.divergences(logs([0.5, 0.5, 0.0]), logs([0.5, 0.3, 0.2]))
    joined = d.PositionDivergences.join([first, second])
    assert joined.tv == pytest.approx([0.25, 0.2])
    assert joined.same_support.tolist() == [True, False]


def random_rows(rng, positions: int, vocab: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    logits = rng.normal(scale=2.0, size=(positions, vocab))
    mu = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    perturbed = logits + rng.normal(scale=noise, size=logits.shape)
    pi = perturbed - np.log(np.exp(perturbed).sum(axis=1, keepdims=True))
    return mu, pi


def draw(rng, logp: np.ndarray) -> np.ndarray:
    """One token per row, drawn from exp(logp)."""
    cumulative = np.cumsum(np.exp(logp), axis=1)
    u = rng.random(len(logp))[:, None] * cumulative[:, -1:]
    return (cumulative < u).sum(axis=1)


def test_sampled_token_k3_estimates_the_exact_kl_within_three_standard_errors():
    rng = np.random.default_rng(7)
    mu, pi = random_rows(rng, 4000, 30, noise=0.3)
    tokens = draw(rng, mu)
    rows = np.arange(len(mu))
    terms = k3_terms(pi[rows, tokens], mu[rows, tokens])
    exact = d.divergences(mu, pi).kl_engine_trainer
    se = terms.std(ddof=1) / math.sqrt(len(terms))
    assert abs(terms.mean() - exact.mean()) < 3 * se
    assert se < 0.1 * exact.mean()  # the check has power: KL is far from 0 on this scale


def test_summary_means_intervals_and_the_agreement_line():
    rng = np.random.default_rng(11)
    mu, pi = random_rows(rng, 2000, 30, noise=0.3)
    prompts = np.repeat(np.arange(100), 20)
    tokens = draw(rng, mu)
    rows = np.arange(len(mu))
    positions = d.PositionDivergences.join([d.divergences(mu[:700], pi[:700]), d.divergences(mu[700:], pi[700:])])
    summary = d.distribution_summary(
        positions, prompts, logp_trainer=pi[rows, tokens], logp_engine=mu[rows, tokens], seed=3
    )
    kl = summary["kl_engine_trainer"]
    assert kl["value"] == pytest.approx(positions.kl_engine_trainer.mean())
    assert kl["low"] < kl["value"] < kl["high"]
    assert summary["k3_expected"]["value"] == pytest.approx(kl["value"], abs=1e-12)
    assert summary["positions"] == 2000 and summary["prompts"] == 100 and not summary["nucleus"]
    assert summary["positions_infinite_engine_trainer"] == 0 and summary["positions_disjoint"] == 0
    assert summary["k3_tokens"] == 2000
    assert summary["k3_agrees"] is True
    line = d.agreement_line(summary)
    assert line.startswith("sampled-token k3 ") and " agrees with the exact KL[μ‖π] " in line
    assert "2000 positions of 100 prompts" in line
    # the same k3 against a trainer three times further off: the check fails
    _, far = random_rows(np.random.default_rng(11), 2000, 30, noise=1.0)
    wrong = d.distribution_summary(positions, prompts, logp_trainer=far[rows, tokens], logp_engine=mu[rows, tokens])
    assert wrong["k3_agrees"] is False
    assert " does not agree " in d.agreement_line(wrong)


def nucleus(logp: np.ndarray, top_p: float) -> np.ndarray:
    """Each row cut to its top-p nucleus and renormalised (−inf outside)."""
    order = np.argsort(-logp, axis=1)
    sorted_probs = np.take_along_axis(np.exp(logp), order, axis=1)
    before = np.cumsum(sorted_probs, axis=1) - sorted_probs
    keep = np.zeros(logp.shape, dtype=bool)
    np.put_along_axis(keep, order, before < top_p, axis=1)
    cut = np.where(keep, logp, -INF)
    return cut - np.log(np.exp(cut).sum(axis=1, keepdims=True))


def test_with_a_nucleus_the_sampled_k3_estimates_its_exact_expectation():
    rng = np.random.default_rng(5)
    mu_full, pi_full = random_rows(rng, 6000, 30, noise=0.5)
    mu = nucleus(mu_full, 0.8)
    pi = nucleus(pi_full, 0.8)
    prompts = np.repeat(np.arange(300), 20)
    tokens = draw(rng, mu)
    rows = np.arange(len(mu))
    positions = d.divergences(mu, pi)
    assert positions.engine_mass_outside.max() > 0  # the nuclei differ somewhere
    summary = d.distribution_summary(positions, prompts, logp_trainer=pi[rows, tokens], logp_engine=mu[rows, tokens])
    assert summary["nucleus"]
    assert summary["kl_engine_trainer"]["value"] == INF
    assert summary["positions_infinite_engine_trainer"] == int((positions.engine_mass_outside > 0).sum())
    assert summary["k3_tokens"] == int(np.isfinite(pi[rows, tokens]).sum()) < 6000
    terms = k3_terms(pi[rows, tokens], mu[rows, tokens])
    terms = terms[np.isfinite(terms)]
    se = terms.std(ddof=1) / math.sqrt(len(terms))
    assert abs(terms.mean() - summary["k3_expected"]["value"]) < 3 * se
    assert summary["k3_agrees"] is True
    shared = summary["kl_engine_trainer_shared"]
    assert shared["low"] < shared["value"] < shared["high"]
    assert summary["engine_mass_outside"]["value"] == pytest.approx(positions.engine_mass_outside.mean())
    line = d.agreement_line(summary)
    assert "its exact expectation" in line and "of μ's mass outside π's nucleus" in line
