"""Each loss on hand-made tensors, checked against values worked out by hand."""

import math

import pytest
import torch

from mismatch.learner import losses
from mismatch.learner.rewards import final_number, reward

# Two sequences: lengths 2 and 1 (mask), advantages +1 and −1.
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
ADV = torch.tensor([1.0, -1.0])
LOGP_OLD = torch.log(torch.tensor([[0.5, 0.5], [0.4, 1.0]]))
LOGP_ENGINE = torch.log(torch.tensor([[0.25, 0.5], [0.8, 1.0]]))  # π′/μ = 2, 1 | 0.5
BATCH = {"logp_old": LOGP_OLD, "logp_engine": LOGP_ENGINE, "adv": ADV, "mask": MASK}


def _params(ratio):
    """log π_θ = log π_θ′ + log(ratio), as a leaf with grad."""
    return (LOGP_OLD + torch.log(torch.tensor(ratio))).requires_grad_()


def test_grpo_clip():
    logp = _params([[1.5, 1.0], [0.5, 1.0]])
    # seq0 A=+1: min(1.5, 1.2)=1.2 → −1.2 ; min(1,1)=1 → −1 ; seq1 A=−1, r=0.5: min(−0.5, −0.8) = −0.8 → +0.8
    assert losses.grpo(logp, **BATCH).item() == pytest.approx((-1.2 - 1.0 + 0.8) / 3)


def test_grpo_gradient_is_policy_gradient_at_ratio_one():
    logp = _params([[1.0, 1.0], [1.0, 1.0]])
    losses.grpo(logp, **BATCH).backward()
    # d/dlogp of −r·A with r = exp(logp − logp_old) = 1: −A/3 per token; padding gets 0
    assert logp.grad.flatten().tolist() == pytest.approx([-1 / 3, -1 / 3, 1 / 3, 0.0])


def test_gspo_sequence_ratio_is_length_normalised_and_tightly_clipped():
    logp = _params([[1.0, 1.0], [1.0, 1.0]])
    assert losses.gspo(logp, **BATCH).item() == pytest.approx((-1 + 1) / 2)
    logp = _params([[4.0, 1.0], [1.0, 1.0]])  # s0 = exp(mean(log 4, 0)) = 2 → clipped to 1 + 4e-4
    assert losses.gspo(logp, **BATCH).item() == pytest.approx((-(1 + 4e-4) + 1) / 2, abs=1e-7)


def test_token_tis_weights_are_truncated_at_two():
    logp = _params([[1.0, 1.0], [1.0, 1.0]])
    # weights min(π′/μ, 2): 2, 1 | 0.5 ; per-token GRPO terms at r = 1: −1, −1 | +1
    assert losses.token_tis(logp, **BATCH).item() == pytest.approx((-2 - 1 + 0.5) / 3)
    engine_far = LOGP_ENGINE - math.log(10)  # π′/μ = 20, 10 | 5 → all capped at 2
    assert losses.token_tis(logp, **BATCH | {"logp_engine": engine_far}).item() == pytest.approx((-2 - 2 + 2) / 3)


def test_seq_mis_masks_sequences_whose_ratio_exceeds_c():
    logp = _params([[1.0, 1.0], [1.0, 1.0]])
    # ρ0 = 2·1 = 2, ρ1 = 0.5 → weights 2 and 0.5
    assert losses.seq_mis(logp, **BATCH).item() == pytest.approx((-2 - 2 + 0.5) / 3)
    engine = LOGP_ENGINE.clone()
    engine[0, 1] -= math.log(6)  # ρ0 = 12 > 10 → sequence 0 masked out (not truncated)
    assert losses.seq_mis(logp, **BATCH | {"logp_engine": engine}).item() == pytest.approx(0.5 / 3)


def test_pg_seq_is():
    logp = _params([[1.0, 1.0], [1.0, 1.0]])
    # −Σ ρ·A·logπ / N = −(2·1·(log .5 + log .5) + 0.5·(−1)·log .4) / 3
    want = -(2 * 2 * math.log(0.5) - 0.5 * math.log(0.4)) / 3
    assert losses.pg_seq_is(logp, **BATCH).item() == pytest.approx(want)


def test_group_advantages():
    adv = losses.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), group_size=3)
    std = torch.tensor([1.0, 0.0, 0.0]).std().item()
    assert adv.tolist() == pytest.approx([(2 / 3) / std, (-1 / 3) / std, (-1 / 3) / std, 0.0, 0.0, 0.0], abs=1e-5)


@pytest.mark.parametrize(
    "text, value",
    [
        ("So 12 + 35 = 47.", 47.0),
        ("The answer is \\boxed{-3} (not 5)", -3.0),
        ("1,234 apples", 1234.0),
        ("no digits", None),
        ("x = 2.50", 2.5),
    ],
)
def test_final_number(text, value):
    assert final_number(text) == value


def test_reward():
    assert reward("12 + 35 = 47", "47") == 1.0
    assert reward("12 + 35 = 47, minus 2 is 45", "47") == 0.0
    assert reward("", "0") == 0.0
