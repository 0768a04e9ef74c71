"""What engine and trainer compute, kept equal or named when they differ: the semantic probe, an
engine that refuses a dtype, nucleus sampling, and the HF engine's generation defaults."""

import json

import numpy as np
import pandas as pd
import pytest
from families import build_family
from transformers import AutoTokenizer, GenerationConfig
from typer.testing import CliRunner

from mismatch.cli import app
from mismatch.engines import start_engine
from mismatch.model.rescore import load_trainer, rescore
from mismatch.records import Sampling

runner = CliRunner()


def scan(*args):
    return runner.invoke(app, ["scan", *map(str, args)])


@pytest.fixture(scope="module")
def gemma2(tiny_model, tmp_path_factory):
    """Gemma-2 with both softcaps: vLLM refuses it in FP16, and SDPA would drop its attention cap."""
    folder = tmp_path_factory.mktemp("gemma2")
    build_family("gemma2-both-softcaps", folder, AutoTokenizer.from_pretrained(tiny_model))
    return folder


@pytest.mark.engine
def test_a_refused_engine_dtype_is_one_line_and_the_scan_goes_on(gemma2, tmp_path):
    result = scan("--model", gemma2, "--engine", "vllm", "--num-prompts", 4, "--max-tokens", 16, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert (
        "notice: vllm refuses fp16 for this model (The model type 'gemma2' does not support float16." in result.output
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["refused_dtypes"]) == ["fp16"]
    pairs = [(p["engine_dtype"], p["trainer_dtype"]) for p in summary["pairs"]]
    assert pairs == [
        ("bf16", "bf16"),
        ("bf16", "fp32"),
        ("bf16", "fp16"),
        ("fp32", "fp32"),
    ]  # FP16 on the trainer side; the probe
    assert summary["fp16_headroom"]["max_abs_activation"] > 0
    assert summary["recommendation"]["verdict"] == "fp16_unavailable"
    assert "FP16 is unavailable in vllm for this model" in summary["recommendation"]["summary"]
    probe = next(p for p in summary["pairs"] if p["engine_dtype"] == "fp32")
    assert probe["n_seqs"] == 4 and probe["k3"] < 1e-6  # eager attention keeps the softcap: parity


@pytest.mark.engine
def test_the_semantic_probe_names_an_implementation_difference(gemma2, tmp_path, monkeypatch):
    """transformers' SDPA silently drops Gemma-2's attention softcap; vLLM applies it. With the
    trainer forced onto SDPA the two disagree in FP32, and the verdict must say so."""
    monkeypatch.setattr("mismatch.model.loading.attention_implementation", lambda config: "sdpa")
    result = scan(
        "--model",
        gemma2,
        "--engine",
        "vllm",
        "--dtypes",
        "bf16",
        "--num-prompts",
        4,
        "--max-tokens",
        16,
        "--out",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    probe = next(p for p in summary["pairs"] if p["engine_dtype"] == "fp32")
    assert probe["k3"] > 1e-4
    assert summary["recommendation"]["verdict"] == "implementation_difference"
    assert "disagree even in FP32" in result.output and "no dtype change is recommended" in result.output


def test_without_the_probe_the_verdict_says_what_it_rests_on(tiny_model, tmp_path):
    result = scan(
        "--model",
        tiny_model,
        "--engine",
        "hf",
        "--num-prompts",
        2,
        "--max-tokens",
        4,
        "--semantic-probe",
        0,
        "--out",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["semantic_probe"] == {"prompts": 0, "skipped": "--semantic-probe 0"}
    assert "cannot rule out an implementation difference" in summary["recommendation"]["summary"]
    assert all(p["engine_dtype"] != "fp32" for p in summary["pairs"])


def test_top_p_tokens_outside_the_trainer_nucleus_are_not_overflow(tiny_model, tmp_path):
    result = scan(
        "--model",
        tiny_model,
        "--engine",
        "hf",
        "--top-p",
        0.6,
        "--num-prompts",
        6,
        "--max-tokens",
        24,
        "--out",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    tokens = pd.read_parquet(tmp_path / "tokens.parquet")
    for pair in summary["pairs"]:
        group = tokens[(tokens.engine_dtype == pair["engine_dtype"]) & (tokens.trainer_dtype == pair["trainer_dtype"])]
        outside = np.isneginf(group["logp_trainer"]) & np.isfinite(group["logp_trainer_full"])
        assert pair["n_nonfinite"] == 0 and pair["n_outside_nucleus"] == int(outside.sum())
        assert pair["n_tokens"] + pair["n_outside_nucleus"] == len(group)
        assert 0.6 <= pair["mean_kept_mass"] < 1 and pair["nucleus_log_bias"] > 0
    assert summary["recommendation"]["verdict"] != "fp16_unsafe"
    assert "sampled outside the trainer&#39;s nucleus" in (tmp_path / "report.html").read_text()


def test_hf_engine_samples_with_exactly_the_trainers_processors(tiny_model, tmp_path):
    """A generation_config with repetition_penalty, top_k and min_p must not leak into μ."""
    folder = tmp_path / "opinionated"
    load_trainer(tiny_model, "fp32").save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    GenerationConfig(
        do_sample=True, repetition_penalty=1.5, top_k=3, min_p=0.3, eos_token_id=2, pad_token_id=0
    ).save_pretrained(folder)
    engine = start_engine("hf", folder, "fp32")
    rollouts = engine.generate([[5, 6, 7], [8, 9, 10, 11]], 2, Sampling(temperature=1.0, max_tokens=16, seed=1))
    engine.close()
    pi = rescore(load_trainer(folder, "fp32"), "fp32", rollouts, 1.0)["logp_trainer"]
    gap = np.concatenate([p - np.array(r.logp_engine) for p, r in zip(pi, rollouts, strict=True)])
    assert np.abs(gap).max() < 1e-4


def test_resume_accepts_a_subset_of_the_saved_dtypes(tiny_model, tmp_path):
    args = ("--model", tiny_model, "--engine", "hf", "--num-prompts", 2, "--max-tokens", 4, "--out", tmp_path)
    assert scan(*args, "--dtypes", "bf16,fp16").exit_code == 0
    saved = pd.read_parquet(tmp_path / "rollouts.parquet")
    result = scan(*args, "--dtypes", "bf16", "--resume")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "generate_bf16 (resumed)" in summary["finished"] and not any(
        k.startswith("generate") for k in summary["timings"]
    )
    tokens = pd.read_parquet(tmp_path / "tokens.parquet")
    assert tokens[tokens.engine_dtype == "bf16"]["logp_engine"].tolist()[:3] == list(
        saved[saved.engine_dtype == "bf16"].iloc[0]["logp_engine"][:3]
    )
