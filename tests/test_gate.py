import pytest

from mismatch.records import DTYPE_NAMES, DUMP_SIDES
from mismatch.verdict.gate import Condition, check_pairs, evaluate, parse_condition

PAIRS = [
    {"engine_dtype": "bf16", "trainer_dtype": "bf16", "k3": 2e-3, "max_abs_dp": 0.1, "seq_slope_per_1k": None},
    {"engine_dtype": "bf16", "trainer_dtype": "fp32", "k3": 1e-3, "max_abs_dp": 0.6, "seq_slope_per_1k": 0.1},
    {"engine_dtype": "fp16", "trainer_dtype": "fp16", "k3": 2e-5, "max_abs_dp": 0.02, "seq_slope_per_1k": 0.2},
]


def test_parse():
    assert parse_condition(" k3 >= 1e-3 ") == Condition("k3 >= 1e-3", "k3", ">=", 1e-3)
    assert parse_condition("bf16/fp32:max_abs_dp<0.5").pair == ("bf16", "fp32")


def test_default_pairs_are_equal_dtypes_and_failures_name_the_value():
    gate = evaluate([parse_condition("k3>1e-3")], PAIRS)
    assert gate == {"conditions": ["k3>1e-3"], "failed": ["bf16/bf16:k3 = 0.002 > 0.001"], "not_measured": []}
    assert evaluate([parse_condition("bf16/fp32:max_abs_dp>0.5")], PAIRS)["failed"] == [
        "bf16/fp32:max_abs_dp = 0.6 > 0.5"
    ]
    assert evaluate([parse_condition("k3<=2e-5")], PAIRS)["failed"] == ["fp16/fp16:k3 = 2e-05 <= 2e-05"]
    assert evaluate([parse_condition("k3>1")], PAIRS)["failed"] == []


def test_undefined_value_is_not_measured_and_does_not_fail_the_gate():
    gate = evaluate([parse_condition("bf16/bf16:seq_slope_per_1k>1")], PAIRS)
    assert gate["failed"] == []
    assert gate["not_measured"] == [
        "bf16/bf16:seq_slope_per_1k is undefined for this run (gate bf16/bf16:seq_slope_per_1k>1 not applied)"
    ]


def test_conditions_must_match_a_scanned_pair():
    with pytest.raises(ValueError, match="no pair of equal dtypes"):
        check_pairs([parse_condition("k3>1")], [("bf16", "fp32")])


def test_an_analysed_dumps_gate_applies_to_every_pair_unless_one_is_named():
    pairs = [
        {"engine_dtype": "engine", "trainer_dtype": "trainer", "k3": 3e-3},
        {"engine_dtype": "engine", "trainer_dtype": "bf16", "k3": 5e-4},
    ]
    gate = evaluate([parse_condition("k3>1e-3")], pairs, every_pair=True)
    assert gate["failed"] == ["engine/trainer:k3 = 0.003 > 0.001"]
    assert evaluate([parse_condition("k3>1e-4")], pairs, every_pair=True)["failed"] == [
        "engine/trainer:k3 = 0.003 > 0.0001",
        "engine/bf16:k3 = 0.0005 > 0.0001",
    ]
    assert evaluate([parse_condition("k3>1e-3")], pairs)["failed"] == []  # a scan's default: equal dtypes, none here
    named = evaluate([parse_condition("engine/fp16:k3>1e-3", (*DUMP_SIDES, *DTYPE_NAMES))], pairs, every_pair=True)
    assert named["failed"] == [] and named["not_measured"] == [
        "engine/fp16:k3: the pair was not measured (gate engine/fp16:k3>1e-3 not applied)"
    ]
