"""`mismatch scan` end to end on the tiny model, through the CLI, with both engines."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import VLLM
from typer.testing import CliRunner

from mismatch.cli import app
from mismatch.stats import metrics

runner = CliRunner()
TOKEN_COLUMNS = {
    "seq_id",
    "position",
    "token_id",
    "token",
    "engine_dtype",
    "trainer_dtype",
    "logp_engine",
    "logp_trainer",
    "logp_trainer_full",
    "log_kept_mass",
    "response_len",
}


def scan(*args):
    return runner.invoke(app, ["scan", *map(str, args)])


@pytest.fixture(params=[VLLM, "hf"])
def run(request, shared_scan):
    """(run folder, terminal output, engine processes used)."""
    return shared_scan(request.param)


def test_one_engine_process_per_engine_dtype(run):
    """bf16, fp16 and the FP32 probe: three vLLM processes, the dtype check inside the first; none for hf."""
    out, _, processes = run
    summary = json.loads((out / "summary.json").read_text())
    assert processes == (3 if summary["config"]["engine"] == "vllm" else 0)


def test_outputs_exist_and_terminal_shows_the_table(run):
    out, output, _ = run
    assert {p.name for p in out.iterdir()} >= {"tokens.parquet", "summary.json", "metrics.csv", "rollouts.parquet"}
    assert "bf16→bf16" in output and "fp16→fp32" in output and "Verdict:" in output


def test_token_frame_contract(run):
    out, _, _ = run
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert TOKEN_COLUMNS <= set(tokens.columns)
    assert tokens["logp_engine"].dtype == np.float64 and tokens["logp_trainer"].dtype == np.float64
    pairs = set(map(tuple, tokens[["engine_dtype", "trainer_dtype"]].drop_duplicates().to_numpy()))
    assert pairs == {
        ("bf16", "bf16"),
        ("bf16", "fp32"),
        ("fp16", "fp16"),
        ("fp16", "fp32"),
        ("fp32", "fp32"),
    }  # the last: the semantic probe
    for _, group in tokens.groupby(["engine_dtype", "trainer_dtype", "seq_id"]):
        assert group["position"].tolist() == list(range(len(group))) == list(range(group["response_len"].iloc[0]))
    seqs = tokens.groupby(["engine_dtype", "trainer_dtype"])["seq_id"].nunique()
    assert seqs.drop(("fp32", "fp32")).eq(8).all() and seqs["fp32", "fp32"] == 4  # the probe: 4 prompts by default


def test_same_tokens_rescored_for_every_trainer_dtype(run):
    out, _, _ = run
    tokens = pd.read_parquet(out / "tokens.parquet")
    for engine_dtype, group in tokens.groupby("engine_dtype"):
        ids = [g["token_id"].tolist() for _, g in group.groupby("trainer_dtype")]
        engine = [g["logp_engine"].tolist() for _, g in group.groupby("trainer_dtype")]
        assert len(ids) == (
            1 if engine_dtype == "fp32" else 2
        )  # fp32: the semantic probe, scored by the fp32 trainer only
        assert all(x == ids[0] for x in ids) and all(x == engine[0] for x in engine)


def test_every_summary_number_recomputes_from_tokens(run):
    out, _, _ = run
    summary = json.loads((out / "summary.json").read_text())
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert summary["complete"] is True
    assert summary["config"]["sampling"] == {"temperature": 1.0, "top_p": 1.0, "max_tokens": 32, "seed": 0}
    assert summary["versions"]["torch"]
    seed = summary["config"]["sampling"]["seed"]
    for pair in summary["pairs"]:
        group = tokens[(tokens.engine_dtype == pair["engine_dtype"]) & (tokens.trainer_dtype == pair["trainer_dtype"])]
        again = metrics.pair_metrics(
            group["logp_trainer"],
            group["logp_engine"],
            group["seq_id"],
            seed=seed,
            prompt_ids=group["prompt_index"],
            logp_trainer_full=group["logp_trainer_full"],
            log_kept_mass=group["log_kept_mass"],
        )
        for name in (
            *metrics.METRICS,
            *metrics.NUCLEUS_METRICS,
            "n_tokens",
            "n_seqs",
            "n_nonfinite",
            "k3_ci_low",
            "k3_ci_high",
            "mean_abs_dp_ci_low",
            "mean_abs_dp_ci_high",
        ):
            if pair[name] is None:
                assert np.isnan(again[name]), name
            else:
                assert pair[name] == pytest.approx(again[name], rel=1e-12, abs=1e-15), name
    table = pd.read_csv(out / "metrics.csv")
    assert table["k3"].tolist() == pytest.approx([p["k3"] for p in summary["pairs"]])
    assert summary["recommendation"]["verdict"] in {"switch_to_fp16", "fp16_not_enough", "at_floor"}
    assert summary["recommendation"]["summary"]


def test_fp16_gap_is_below_bf16_gap(run):
    out, _, _ = run
    pairs = {
        (p["engine_dtype"], p["trainer_dtype"]): p for p in json.loads((out / "summary.json").read_text())["pairs"]
    }
    assert pairs["fp16", "fp16"]["k3"] < pairs["bf16", "bf16"]["k3"]


def test_all_pairs(tiny_model, tmp_path):
    result = scan(
        "--model",
        tiny_model,
        "--engine",
        "hf",
        "--dtypes",
        "bf16,fp16",
        "--pairs",
        "all",
        "--num-prompts",
        2,
        "--max-tokens",
        4,
        "--out",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(p["engine_dtype"], p["trainer_dtype"]) for p in summary["pairs"]] == [
        (e, t) for e in ("bf16", "fp16") for t in ("bf16", "fp16", "fp32")
    ] + [("fp32", "fp32")]  # the semantic probe


def test_prompt_file_and_samples(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 1 + 1?"}\n{"messages": [{"role": "user", "content": "hello"}]}\n')
    out = tmp_path / "run"
    result = scan(
        "--model",
        tiny_model,
        "--engine",
        "hf",
        "--dtypes",
        "fp16",
        "--prompts",
        prompts,
        "--samples",
        3,
        "--max-tokens",
        4,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    rollouts = pd.read_parquet(out / "rollouts.parquet")
    rollouts = rollouts[rollouts.engine_dtype == "fp16"]  # the fp32 rows are the semantic probe's
    assert len(rollouts) == 6 and sorted(rollouts["seq_id"]) == list(range(6))
    assert rollouts["prompt"].iloc[0].startswith("<|im_start|>user\nWhat is 1 + 1?")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dtypes", "bf16,int8"], "unknown dtype int8"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--samples", "0"], "--samples must be at least 1"),
        (["--engine", "tgi", "--dtypes", "bf16"], "unknown engine"),
        (["--pairs", "some"], "--pairs must be"),
        (["--prompts", "nowhere.jsonl"], "prompt file nowhere.jsonl not found"),
        (["--model", "/no/such/folder-or/hub-id"], "not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    engine = [] if "--engine" in args else ["--engine", "hf"]
    result = scan(*args, *engine, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_existing_output_folder_is_refused_without_force(tiny_model, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = scan("--model", tiny_model, "--engine", "hf", "--out", tmp_path)
    assert result.exit_code == 2 and "--force" in result.output
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_reference_none_skips_the_fp32_trainer_and_a_number_scores_the_first_sequences(tiny_model, tmp_path):
    common = (
        "--model",
        tiny_model,
        "--engine",
        "hf",
        "--dtypes",
        "bf16",
        "--num-prompts",
        5,
        "--max-tokens",
        8,
        "--semantic-probe",
        0,
    )
    assert scan(*common, "--out", tmp_path / "all").exit_code == 0
    result = scan(*common, "--reference", "2", "--out", tmp_path / "two")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["reference"]["sequences"] == "2" and summary["reference"]["fp32_gib"] > 0
    pairs = {(p["engine_dtype"], p["trainer_dtype"]): p for p in summary["pairs"]}
    assert pairs["bf16", "fp32"]["n_seqs"] == 2 and pairs["bf16", "bf16"]["n_seqs"] == 5
    full, part = (
        pd.read_parquet(tmp_path / name / "tokens.parquet").query("trainer_dtype == 'fp32'") for name in ("all", "two")
    )
    first = full[full["seq_id"].isin(part["seq_id"].unique())]
    assert sorted(part["seq_id"].unique()) == sorted(full["seq_id"].unique())[:2]
    np.testing.assert_allclose(
        part["logp_trainer"].to_numpy(), first["logp_trainer"].to_numpy(), rtol=0, atol=1e-6
    )  # same model, fewer rows a batch

    result = scan(
        "--model",
        tiny_model,
        "--engine",
        "hf",
        "--dtypes",
        "bf16",
        "--num-prompts",
        2,
        "--max-tokens",
        4,
        "--reference",
        "none",
        "--out",
        tmp_path / "none",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "none" / "summary.json").read_text())
    assert [(p["engine_dtype"], p["trainer_dtype"]) for p in summary["pairs"]] == [("bf16", "bf16")]
    assert "--reference none" in summary["semantic_probe"]["skipped"]
    for bad in ("0", "some"):
        result = scan("--model", tiny_model, "--reference", bad, "--out", tmp_path / "bad")
        assert result.exit_code == 2 and "--reference must be all, none or a number" in result.output
