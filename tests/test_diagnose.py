"""`mismatch diagnose` on tiny models through the real vLLM engine: every component recomputes from
tokens.parquet, and each is pinned where its answer is known."""

import json

import numpy as np
import pandas as pd
import pytest
from families import build_family
from transformers import AutoTokenizer
from typer.testing import CliRunner

from mismatch.cli import app
from mismatch.commands.diagnose import COMPONENTS
from mismatch.stats import metrics

runner = CliRunner()


def diagnose(*args):
    return runner.invoke(app, ["diagnose", *map(str, args)])


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("diagnose")
    result = diagnose(
        "--model",
        tiny_model,
        "--dtypes",
        "bf16,fp32",
        "--num-prompts",
        6,
        "--max-tokens",
        16,
        "--topk",
        5,
        "--out",
        out,
        "--force",
    )
    assert result.exit_code == 0, result.output
    return out, result.output, json.loads((out / "summary.json").read_text())


def components(summary, dtype):
    return {c["name"]: c for c in summary["diagnosis"]["components"] if c["engine_dtype"] == dtype}


@pytest.mark.engine
def test_summary_contract_and_terminal(run):
    out, output, summary = run
    assert summary["kind"] == "diagnose" and summary["complete"]
    assert set(components(summary, "bf16")) == set(COMPONENTS)
    assert set(components(summary, "fp32")) == set(COMPONENTS) - {
        "engine_precision",
        "trainer_precision",
    }  # identically 0 there
    for c in summary["diagnosis"]["components"]:
        assert {"name", "engine_dtype", "k3", "k3_ci_low", "k3_ci_high", "mean_abs_dlogp", "n_tokens"} <= set(c)
    assert set(summary["diagnosis"]["dominant"]) == {"bf16", "fp32"}
    assert set(summary["diagnosis"]["dominant"]["bf16"]) == {"name", "k3", "k3_ratio_to_total", "close"}
    assert [entry["trainer_dtype"] for entry in summary["diagnosis"]["layers"]] == ["fp32", "bf16"]
    assert summary["recommendation"]["summary"] and "Where the gap comes from" in output
    assert {p.name for p in out.iterdir()} >= {
        "report.html",
        "summary.md",
        "tokens.parquet",
        "topk.parquet",
        "rollouts.parquet",
        "summary.json",
    }


@pytest.mark.engine
def test_every_component_recomputes_from_tokens(run):
    out, _, summary = run
    tokens = pd.read_parquet(out / "tokens.parquet")
    for c in summary["diagnosis"]["components"]:
        reference, compared = COMPONENTS[c["name"]]
        group = tokens[tokens.engine_dtype == c["engine_dtype"]].dropna(subset=[reference, compared])
        again = metrics.pair_metrics(
            group[compared], group[reference], group["seq_id"], seed=0, prompt_ids=group["prompt_index"]
        )
        assert c["k3"] == pytest.approx(again["k3"], rel=1e-12, abs=1e-300)
        assert c["mean_abs_dlogp"] == pytest.approx(np.mean(np.abs(group[compared] - group[reference])))


@pytest.mark.engine
def test_known_answers(run):
    _, _, summary = run
    bf16, fp32 = components(summary, "bf16"), components(summary, "fp32")
    # a sound architecture: the FP32 engine and the FP32 trainer agree to the numerical floor
    assert bf16["semantic"]["k3"] < 1e-9 and fp32["semantic"]["k3"] < 1e-9
    # BF16 rounding is what separates a BF16 engine from a BF16 trainer here, on both sides
    assert (
        bf16["engine_precision"]["k3"] > 1e3 * bf16["semantic"]["k3"]
        and bf16["trainer_precision"]["k3"] > 1e3 * bf16["semantic"]["k3"]
    )
    assert summary["diagnosis"]["dominant"]["bf16"]["name"] in ("engine_precision", "trainer_precision")
    # FP32 on CPU: the trainer scores a sequence alone exactly as inside a padded batch
    assert fp32["trainer_batch"]["k3"] == 0.0 and fp32["trainer_batch"]["mean_abs_dlogp"] == 0.0
    # the engine's decode and its prefill of the same sequence agree closely in FP32
    assert fp32["engine_decode_vs_prefill"]["k3"] < 1e-9


@pytest.mark.engine
def test_layers_and_topk(run):
    out, _, summary = run
    fp32_layers, bf16_layers = (entry["layers"] for entry in summary["diagnosis"]["layers"])
    assert [r["name"] for r in bf16_layers][:2] == ["embedding", "layer 0"] and bf16_layers[-1]["name"] == "logits"
    assert all(r["relative_error"] == 0 for r in fp32_layers)
    assert all(r["relative_error"] > 0 for r in bf16_layers[1:])
    assert all(0 < r["fraction_of_fp16_limit"] < 1 for r in bf16_layers if r["fraction_of_fp16_limit"] is not None)
    topk = pd.read_parquet(out / "topk.parquet")
    assert topk.groupby(["engine_dtype", "seq_id", "position"]).size().eq(5).all()
    fp32_view = next(t for t in summary["diagnosis"]["topk"] if t["engine_dtype"] == "fp32")
    assert fp32_view["mean_overlap"] == 1.0 and fp32_view["mean_tv_topk"] < 1e-5


@pytest.mark.engine
def test_report_and_markdown(run):
    out, _, _ = run
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "Where the gap comes from" in html and "<script" not in html
    markdown = (out / "summary.md").read_text()
    assert "| bf16 | trainer_precision |" in markdown and "**Verdict:**" in markdown
    (out / "report.html").unlink()
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0 and (out / "report.html").read_text() == html


@pytest.mark.engine
def test_a_planted_semantic_difference_dominates(tiny_model, tmp_path, monkeypatch):
    """Gemma-2 with the trainer forced onto SDPA (which drops its attention softcap; vLLM applies it)."""
    folder = tmp_path / "gemma2"
    build_family("gemma2-both-softcaps", folder, AutoTokenizer.from_pretrained(tiny_model))
    monkeypatch.setattr("mismatch.model.loading.attention_implementation", lambda config: "sdpa")
    result = diagnose(
        "--model",
        folder,
        "--dtypes",
        "bf16",
        "--num-prompts",
        4,
        "--max-tokens",
        12,
        "--layer-sequences",
        2,
        "--out",
        tmp_path / "out",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert components(summary, "bf16")["semantic"]["k3"] > 1e-3
    assert summary["diagnosis"]["dominant"]["bf16"]["name"] == "semantic"
    assert "engine and trainer compute different things even in FP32" in summary["recommendation"]["actions"][0]


@pytest.mark.engine
def test_from_a_scan_reuses_its_rollouts(tiny_model, tmp_path):
    scan_dir = tmp_path / "scan"
    assert (
        runner.invoke(
            app,
            [
                "scan",
                "--model",
                str(tiny_model),
                "--engine",
                "vllm",
                "--dtypes",
                "bf16",
                "--num-prompts",
                3,
                "--max-tokens",
                8,
                "--out",
                str(scan_dir),
            ],
        ).exit_code
        == 0
    )
    result = diagnose("--from", scan_dir, "--layer-sequences", 1, "--alone-sequences", 1, "--out", tmp_path / "d")
    assert result.exit_code == 0, result.output
    saved = pd.read_parquet(scan_dir / "rollouts.parquet")
    tokens = pd.read_parquet(tmp_path / "d" / "tokens.parquet")
    assert tokens["logp_engine_decode"].tolist() == [
        lp for r in saved[saved.engine_dtype == "bf16"].itertuples() for lp in r.logp_engine
    ]
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert not any(k.startswith("generate") for k in summary["timings"])
    first = len(saved[saved.engine_dtype == "bf16"].iloc[0]["response_ids"])  # only the first sequence is scored alone
    assert (
        components(summary, "bf16")["engine_batch"]["n_tokens"]
        == components(summary, "bf16")["trainer_batch"]["n_tokens"]
        == first
    )


def test_diagnose_refuses_other_sampling_in_one_line(tmp_path):
    result = runner.invoke(app, ["diagnose", "--from", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "has no summary.json" in result.output and "Traceback" not in result.output
