"""The prime-rl and slime dump readers, on files written in each framework's own on-disk format."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mismatch.dumps import open_format, prime_rl, slime
from mismatch.errors import DumpError

# --- prime-rl: <run_dir>/token_exports/step_<n>/rank_<r>.jsonl (src/prime_rl/trainer/rl/token_export.py)


def _export_record(step, rank, index, token_ids, loss_mask, mu, pi):
    """One record as prime-rl's TokenExporter writes it: every column aligned to token_ids."""
    n = len(token_ids)
    # strict=False: test_prime_rl_errors writes a record whose μ is one token short on purpose
    log_ratio = [None if p is None else p - m for p, m in zip(pi, mu, strict=False)]
    return {
        "schema_version": 1,
        "step": step,
        "rank": rank,
        "micro_step": 0,
        "micro_sequence_idx": index,
        "export_sequence_idx": index,
        "env_name": "gsm8k",
        "token_ids": token_ids,
        "position_ids": list(range(n)),
        "loss_mask": loss_mask,
        "advantages": [0.5 if m else 0.0 for m in loss_mask],
        "inference_logprobs": mu,
        "trainer_logprobs": pi,
        "entropy": [1.0] * n,
        "mismatch_kl": [None if r is None else math.exp(r) - r - 1 for r in log_ratio],
        "log_importance_ratio": log_ratio,
        "importance_ratio": [None if r is None else math.exp(r) for r in log_ratio],
        "prob_delta": [None if p is None else math.exp(p) - math.exp(m) for p, m in zip(pi, mu, strict=False)],
        "is_masked": [False] * n,
        "is_masked_high": [False] * n,
        "is_masked_low": [False] * n,
        "rl_weights": [None] * n,
        "ce_weights": [None] * n,
        "ref_kl_weights": [None] * n,
    }


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in records))


# Single turn: 3 prompt tokens (μ = 0.0, π teacher-forced), 3 completion tokens.
SINGLE = dict(
    token_ids=[151644, 872, 198, 785, 4226, 151645],
    loss_mask=[False, False, False, True, True, True],
    mu=[0.0, 0.0, 0.0, -0.1053, -2.3026, -0.0101],
    pi=[-11.9312, -9.8125, -0.4219, -0.1001, -2.2919, -0.01],
)
# Multi turn: prompt 2, completion 2, tool output 2 (loss_mask false, μ 0.0), completion 2; one π non-finite (null).
MULTI = dict(
    token_ids=[1, 2, 30, 31, 40, 41, 32, 33],
    loss_mask=[False, False, True, True, False, False, True, True],
    mu=[0.0, 0.0, -0.5, -0.25, 0.0, 0.0, -1.5, -0.125],
    pi=[-9.0, -3.0, -0.4, -0.3, -7.0, -2.0, None, -0.2],
)
# A sequence with no trainable token (prime-rl does not write these; the reader skips them).
UNTRAINED = dict(token_ids=[5, 6], loss_mask=[False, False], mu=[0.0, 0.0], pi=[-1.0, -2.0])


@pytest.fixture
def prime_run(tmp_path):
    exports = tmp_path / "run" / "token_exports"
    _write_jsonl(
        exports / "step_1" / "rank_0.jsonl", [_export_record(1, 0, 0, **SINGLE), _export_record(1, 0, 1, **MULTI)]
    )
    _write_jsonl(
        exports / "step_1" / "rank_1.jsonl", [_export_record(1, 1, 0, **UNTRAINED), _export_record(1, 1, 1, **SINGLE)]
    )
    (exports / "step_1" / "STABLE").touch()
    _write_jsonl(exports / "step_2" / "rank_0.jsonl", [_export_record(2, 0, 0, **MULTI)])  # no STABLE yet
    _write_jsonl(exports / "step_10" / "rank_0.jsonl", [_export_record(10, 0, 0, **SINGLE)])
    return tmp_path / "run"


@pytest.fixture
def open_parquet(tmp_path):
    path = tmp_path / "tokens.parquet"
    pd.DataFrame({"seq_id": [0, 0], "position": [0, 1], "token_id": [7, 8], "logp_engine": [-0.1, -0.2]}).to_parquet(
        path
    )
    return path


def test_prime_rl_detects_every_path_form(prime_run, open_parquet, slime_dump):
    exports = prime_run / "token_exports"
    for paths in (
        [prime_run],
        [exports],
        [exports / "step_1"],
        [exports / "step_1" / "rank_0.jsonl", exports / "step_2" / "rank_0.jsonl"],
    ):
        assert prime_rl.detect(paths), paths
        assert not slime.detect(paths) and not open_format.detect(paths), paths
    assert (
        not prime_rl.detect([open_parquet])
        and not prime_rl.detect([slime_dump / "3.pt"])
        and not prime_rl.detect([slime_dump])
    )


def test_prime_rl_reads_one_chunk_per_step_in_numeric_order(prime_run):
    chunks = list(prime_rl.read([prime_run]))
    assert [c.tokens["step"].unique().tolist() for c in chunks] == [[1], [2], [10]]
    step1 = chunks[0].tokens
    assert list(step1.columns) == ["seq_id", "position", "token_id", "logp_engine", "logp_trainer", "step"]
    assert {c: str(t) for c, t in step1.dtypes.items()} == {
        "seq_id": "int64",
        "position": "int64",
        "token_id": "int64",
        "logp_engine": "float64",
        "logp_trainer": "float64",
        "step": "int64",
    }
    # rank 0: SINGLE (seq 0), MULTI (seq 1); rank 1: UNTRAINED skipped, SINGLE (seq 2).
    assert step1["seq_id"].unique().tolist() == [0, 1, 2]
    assert sorted(chunks[0].contexts) == [0, 1, 2]
    single = step1[step1["seq_id"] == 0]
    assert single["position"].tolist() == [0, 1, 2]
    assert single["token_id"].tolist() == [785, 4226, 151645]
    assert single["logp_engine"].tolist() == [-0.1053, -2.3026, -0.0101]
    assert single["logp_trainer"].tolist() == [-0.1001, -2.2919, -0.01]
    assert chunks[0].contexts[0] == ([151644, 872, 198], [785, 4226, 151645])
    assert step1[step1["seq_id"] == 2]["token_id"].tolist() == [785, 4226, 151645]


def test_prime_rl_multi_turn_keeps_only_sampled_tokens(prime_run):
    multi = next(iter(prime_rl.read([prime_run / "token_exports" / "step_2"])))
    rows = multi.tokens
    assert rows["position"].tolist() == [0, 1, 4, 5]  # the tool tokens (response positions 2, 3) have no rows
    assert rows["token_id"].tolist() == [30, 31, 32, 33]
    assert rows["logp_engine"].tolist() == [-0.5, -0.25, -1.5, -0.125]
    assert rows["logp_trainer"].tolist()[:2] == [-0.4, -0.3] and rows["logp_trainer"].tolist()[3] == -0.2
    assert np.isnan(rows["logp_trainer"].iat[2])  # null in the export
    assert multi.contexts == {0: ([1, 2], [30, 31, 40, 41, 32, 33])}


def test_prime_rl_rank_files_named_one_by_one_are_grouped_by_step(prime_run):
    step1 = prime_run / "token_exports" / "step_1"
    chunks = list(
        prime_rl.read(
            [step1 / "rank_1.jsonl", prime_run / "token_exports" / "step_2" / "rank_0.jsonl", step1 / "rank_0.jsonl"]
        )
    )
    assert [int(c.tokens["step"].iat[0]) for c in chunks] == [1, 2]
    assert chunks[0].tokens["seq_id"].unique().tolist() == [0, 1, 2]  # rank 0 first, whatever the order given
    assert chunks[0].contexts[1] == ([1, 2], [30, 31, 40, 41, 32, 33])


def test_prime_rl_errors(tmp_path):
    bad = dict(SINGLE, mu=SINGLE["mu"][:-1])
    _write_jsonl(tmp_path / "step_1" / "rank_0.jsonl", [_export_record(1, 0, 0, **bad)])
    with pytest.raises(DumpError, match=r"rank_0.jsonl:1: the per-token lists differ in length .*inference_logprobs 5"):
        list(prime_rl.read([tmp_path / "step_1"]))
    _write_jsonl(tmp_path / "other.jsonl", [{"seq_id": 0, "token_id": [1], "logp_engine": [-0.1]}])
    with pytest.raises(DumpError, match="other.jsonl: not prime-rl token-export records"):
        list(prime_rl.read([tmp_path / "other.jsonl"]))


# --- slime: torch.save({"rollout_id", "samples": [Sample.to_dict()]}) (slime/observability/rollout_data_utils.py)


def _sample(index, group, prompt_ids, response_ids, log_probs, *, loss_mask="ones", status="completed", remove=False):
    """A sample dict as slime's Sample.to_dict() produces it (every dataclass field, plus a dynamic `trace`)."""
    return {
        "group_index": group,
        "index": index,
        "rollout_id": None,
        "prompt": "What is 2+2?",
        "tokens": prompt_ids + response_ids,
        "multimodal_inputs": None,
        "multimodal_train_inputs": None,
        "multimodal_train_input_id": None,
        "apply_chat_template_kwargs": {},
        "response": "4",
        "response_length": len(response_ids),
        "label": "4",
        "reward": 1.0,
        "loss_mask": [1] * len(response_ids) if loss_mask == "ones" else loss_mask,
        "weight_versions": ["1"],
        "rollout_log_probs": log_probs,
        "rollout_top_p_token_ids": None,
        "rollout_top_p_token_offsets": None,
        "rollout_routed_experts": None,
        "remove_sample": remove,
        "teacher_log_probs": None,
        "status": status,
        "metadata": {},
        "generate_function_path": None,
        "custom_rm_path": None,
        "train_metadata": None,
        "session_id": None,
        "non_generation_time": 0.0,
        "spec_info": {
            "spec_accept_token_num": 0,
            "spec_draft_token_num": 0,
            "spec_verify_ct": 0,
            "completion_token_num": 0,
        },
        "prefix_cache_info": {"cached_tokens": 0, "total_prompt_tokens": len(prompt_ids)},
        "trace": {"trace_id": f"t{index}", "sample_id": index, "group_id": group, "attempt": 0},
    }


ROLLOUT_3 = [
    _sample(12, 6, [1, 2, 3], [10, 11, 12], [-0.1, -0.5, -0.02]),
    _sample(13, 6, [1, 2, 3], [10, 13], [-0.1, -2.3], status="truncated", loss_mask=None),  # None: every response token
    _sample(
        14, 7, [4, 5], [20, 21, 22, 23], [-0.3, 0.0, 0.0, -0.7], loss_mask=[1, 0, 0, 1]
    ),  # tool tokens: μ 0.0, mask 0
    _sample(15, 7, [4, 5], [20, 24], [-0.3, -0.9], remove=True),  # dropped by the trainer
]


@pytest.fixture
def slime_dump(tmp_path):
    folder = tmp_path / "dump" / "rollout_data"
    folder.mkdir(parents=True)
    torch.save({"rollout_id": 3, "samples": ROLLOUT_3}, folder / "3.pt")
    torch.save({"rollout_id": 10, "samples": [_sample(40, 20, [9], [8, 7], [-1.25, -0.5])]}, folder / "10.pt")
    torch.save({"rollout_id": 3, "samples": [_sample(99, 0, [9], [8], [-3.0])]}, folder / "eval_3.pt")
    return folder


def test_slime_detects_its_dump_only(slime_dump, prime_run, open_parquet):
    for paths in (
        [slime_dump.parent],
        [slime_dump],
        [slime_dump / "10.pt", slime_dump / "3.pt"],
    ):  # --dump-details folder, rollout_data/, files
        assert slime.detect(paths), paths
    assert not prime_rl.detect([slime_dump]) and not open_format.detect([slime_dump / "3.pt"])
    assert not slime.detect([prime_run]) and not slime.detect([open_parquet])
    train = slime_dump.parent / "train_data.pt"  # --save-debug-train-data: same top-level keys, other samples
    torch.save(
        {
            "format_version": 2,
            "rollout_id": 3,
            "rank": 0,
            "samples": [{"rollout_position": 0, "tokens": torch.tensor([1])}],
        },
        train,
    )
    assert not slime.detect([train])


def test_slime_reads_one_chunk_per_rollout_in_order(slime_dump):
    chunks = list(slime.read([slime_dump]))  # 3.pt before 10.pt; eval_3.pt left out
    assert [c.tokens["step"].unique().tolist() for c in chunks] == [[3], [10]]
    rows = chunks[0].tokens
    assert list(rows.columns) == ["seq_id", "position", "token_id", "logp_engine", "step", "prompt_index"]
    assert {c: str(t) for c, t in rows.dtypes.items()} == {
        "seq_id": "int64",
        "position": "int64",
        "token_id": "int64",
        "logp_engine": "float64",
        "step": "int64",
        "prompt_index": "int64",
    }
    assert rows["seq_id"].tolist() == [12, 12, 12, 13, 13, 14, 14]  # Sample.index; the removed sample 15 has no rows
    assert rows["position"].tolist() == [0, 1, 2, 0, 1, 0, 3]
    assert rows["token_id"].tolist() == [10, 11, 12, 10, 13, 20, 23]
    assert rows["logp_engine"].tolist() == [-0.1, -0.5, -0.02, -0.1, -2.3, -0.3, -0.7]
    assert rows["prompt_index"].tolist() == [6, 6, 6, 6, 6, 7, 7]
    assert chunks[0].contexts == {
        12: ([1, 2, 3], [10, 11, 12]),
        13: ([1, 2, 3], [10, 13]),
        14: ([4, 5], [20, 21, 22, 23]),
    }
    assert chunks[1].contexts == {40: ([9], [8, 7])}


def test_slime_seq_ids_fall_back_to_the_sample_position(tmp_path):
    samples = [_sample(None, None, [1], [2, 3], [-0.5, -0.25]), _sample(None, None, [1], [4], [-1.0])]
    torch.save({"rollout_id": 0, "samples": samples}, tmp_path / "0.pt")
    (chunk,) = slime.read([tmp_path / "0.pt"])
    assert chunk.tokens["seq_id"].tolist() == [0, 0, 1]
    assert "prompt_index" not in chunk.tokens  # no group_index
    assert chunk.contexts == {0: ([1], [2, 3]), 1: ([1], [4])}


def test_slime_errors(tmp_path):
    torch.save({"rollout_id": 1, "samples": [_sample(0, 0, [1], [2, 3], [-0.5])]}, tmp_path / "1.pt")
    with pytest.raises(DumpError, match=r"1.pt: sample 0 has 1 rollout_log_probs for response_length 2"):
        list(slime.read([tmp_path / "1.pt"]))
    torch.save([{"tokens": [1]}], tmp_path / "2.pt")
    with pytest.raises(
        DumpError, match=r"2.pt: expected slime's \{'rollout_id', 'samples'\} dict \(--save-debug-rollout-data\)"
    ):
        list(slime.read([tmp_path / "2.pt"]))
    (tmp_path / "3.pt").write_text("not a torch file")
    with pytest.raises(DumpError, match=r"3.pt: torch.load failed .*expected slime's"):
        list(slime.read([tmp_path / "3.pt"]))


def test_slime_dumps_with_arrays_and_tensors_load_and_nothing_else_does(tmp_path):
    """slime v0.2.2 to v0.3.0 keep routed experts as a numpy int32 array, v0.3.1 as a tensor; both load
    under weights_only, as do tensors of multimodal inputs and numpy log-probs. An object array does not."""
    experts = np.frombuffer(np.arange(12, dtype=np.int32).tobytes(), dtype=np.int32).reshape(2, 3, 2)
    samples = [
        _sample(0, 0, [1], [2, 3], np.array([-0.5, -0.25])) | {"rollout_routed_experts": experts},
        _sample(1, 0, [1], [4], [-1.0])
        | {
            "rollout_routed_experts": torch.zeros(1, 3, 2, dtype=torch.int32),
            "multimodal_train_inputs": {"pixel_values": torch.ones(1, 3)},
        },
    ]
    torch.save({"rollout_id": 0, "samples": samples}, tmp_path / "0.pt")
    assert slime.detect([tmp_path / "0.pt"])
    (chunk,) = slime.read([tmp_path / "0.pt"])
    assert chunk.tokens["token_id"].tolist() == [2, 3, 4]
    assert chunk.tokens["logp_engine"].tolist() == [-0.5, -0.25, -1.0]
    samples[1]["metadata"] = {"objects": np.array([{"a": 1}], dtype=object)}
    torch.save({"rollout_id": 0, "samples": samples}, tmp_path / "1.pt")
    with pytest.raises(DumpError, match=r"1.pt: (refused|torch.load failed)"):
        slime.detect([tmp_path / "1.pt"])
