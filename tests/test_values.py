"""Each formatter of report/values.py against text written out by hand."""

import math

import numpy as np

from mismatch.report.values import interval, number, percent, ratio, span, tokens_cell
from mismatch.stats.metrics import PairRow, pair_metrics


def test_a_missing_or_non_finite_number_reads_as_a_dash():
    for missing in (None, float("nan"), math.inf, -math.inf, np.float64("nan"), np.inf):
        assert number(missing) == "—"
        assert number(missing, ".4f") == "—"


def test_numbers_in_each_spec():
    assert number(0.000123456) == "1.23e-04"  # the default: scientific, three digits
    assert number(-2.5e-7, ".1e") == "-2.5e-07"
    assert number(0.93127, ".4f") == "0.9313"
    assert number(1.0579, ".3f") == "1.058"
    assert number(0.0, ".3g") == "0"
    assert number(np.float64(0.25), ".4f") == "0.2500"
    assert number(141, ".2e") == "1.41e+02"  # an integer takes the spec too
    assert number(7, "d") == "7"  # a step number; None (no step) reads "—"
    assert number(None, "d") == "—"


def test_intervals():
    assert interval(1.48e-4, 2.96e-4) == "[1.48e-04, 2.96e-04]"
    assert interval(None, float("nan")) == "[—, —]"
    assert interval(0.5, 2.0, ".4f") == "[0.5000, 2.0000]"
    assert span(1.83e-3, 3.8e-3, ".1e") == "1.8e-03–3.8e-03"
    assert span(None, None, ".1e") == "—–—"


def test_ratios_and_percentages():
    assert ratio(0.4213) == "0.421×"
    assert ratio(12.0) == "12×"
    assert ratio(None) == "—"
    assert percent(0.125) == "12.5%"
    assert percent(0.0) == "0%"
    assert percent(1.0) == "100%"
    assert percent(0.000123) == "0.0123%"
    assert percent(None) == "—"


def _pair(n_tokens: int, n_nonfinite: int, n_outside_nucleus: int) -> PairRow:
    metrics = pair_metrics([-1.0], [-1.0], [0])
    return {
        "engine_dtype": "bf16",
        "trainer_dtype": "bf16",
        **metrics,
        "n_tokens": n_tokens,
        "n_nonfinite": n_nonfinite,
        "n_outside_nucleus": n_outside_nucleus,
    }


def test_the_tokens_cell_counts_what_was_left_out():
    assert tokens_cell(_pair(1474, 0, 0)) == "1474"
    assert tokens_cell(_pair(1474, 1, 0)) == "1474 +1 non-finite"
    assert tokens_cell(_pair(238, 0, 7)) == "238 +7 outside nucleus"
    assert tokens_cell(_pair(238, 2, 7)) == "238 +2 non-finite +7 outside nucleus"
    assert tokens_cell(_pair(0, 1, 0)) == "0 +1 non-finite"


def test_the_tokens_cell_of_summary_md_puts_each_count_in_parentheses():
    assert tokens_cell(_pair(1474, 0, 0), parenthesised=True) == "1474"
    assert tokens_cell(_pair(1474, 1, 0), parenthesised=True) == "1474 (+1 non-finite)"
    assert tokens_cell(_pair(238, 0, 7), parenthesised=True) == "238 (+7 outside nucleus)"
    assert tokens_cell(_pair(238, 2, 7), parenthesised=True) == "238 (+2 non-finite) (+7 outside nucleus)"
