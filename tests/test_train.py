"""The GRPO loop on the tiny model through real engines: weight sync, loss scaling, outputs."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from mismatch.cli import app
from mismatch.commands.train import Trainer, share_left, train_one
from mismatch.config import TrainConfig
from mismatch.errors import EngineError
from mismatch.learner.policy import FullPolicy, PolicyMemory, policy_memory
from mismatch.learner.scaling import DynamicLossScaler
from mismatch.model.rescore import load_trainer, rescore

TOLERANCE = {"fp16": 2e-2, "bf16": 1.5e-1}  # engine in dtype vs FP32 rescoring of the same weights


def parity_reward(text: str, answer: str) -> float:
    """A reward the random tiny model can earn, so advantages (and updates) are not zero."""
    return float(len(text) % 2)


def make_trainer(tiny_model, tmp_path, dtype, engine="vllm"):
    config = TrainConfig(
        model=str(tiny_model),
        engine=engine,
        dtypes=dtype,
        out=tmp_path,
        steps=2,
        prompts_per_step=2,
        group_size=4,
        max_tokens=12,
        lr=5e-3,
        num_prompts=8,
    )
    return Trainer(config, dtype, reward_fn=parity_reward)


def engine_vs_fp32(trainer, tiny_model, tmp_path):
    """Max and mean |log μ − log π_fp32| on fresh rollouts, π from the master weights saved to disk."""
    trainer.save(tmp_path / "now")
    rollouts = trainer.engine.generate(trainer.prompt_ids[:3], 2, trainer_sampling())
    fp32 = rescore(load_trainer(tmp_path / "now", "fp32"), "fp32", rollouts, 1.0)["logp_trainer"]
    diff = np.concatenate([p - np.array(r.logp_engine) for p, r in zip(fp32, rollouts, strict=True)])
    return np.abs(diff).max(), np.abs(diff).mean()


def trainer_sampling():
    from mismatch.records import Sampling

    return Sampling(temperature=1.0, max_tokens=12, seed=5)


@pytest.mark.engine
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_weights_reach_the_live_vllm_engine_after_each_step(dtype, tiny_model, tmp_path):
    trainer = make_trainer(tiny_model, tmp_path, dtype)
    assert trainer.sleeps is False  # sleep mode is for GPUs
    try:
        before = {k: v.clone() for k, v in trainer.policy.master.state_dict().items()}
        results = [trainer.step(step) for step in range(2)]
        assert not any(r.row["skipped"] for r in results)
        moved = max((trainer.policy.master.state_dict()[k] - v).abs().max().item() for k, v in before.items())
        assert moved > 1e-3  # the policy really changed
        worst, mean = engine_vs_fp32(trainer, tiny_model, tmp_path)
        assert worst < TOLERANCE[dtype]
        # against the *initial* weights the engine would be far off: the sync is what closes the gap
        rollouts = trainer.engine.generate(trainer.prompt_ids[:3], 2, trainer_sampling())
        initial = rescore(load_trainer(tiny_model, "fp32"), "fp32", rollouts, 1.0)["logp_trainer"]
        stale = np.concatenate([p - np.array(r.logp_engine) for p, r in zip(initial, rollouts, strict=True)])
        assert np.abs(stale).mean() > 5 * mean
    finally:
        trainer.close()


def test_injected_inf_gradient_skips_the_step_and_backs_off_the_loss_scale(tiny_model, tmp_path):
    trainer = make_trainer(tiny_model, tmp_path, "fp16", engine="hf")
    try:
        before = {k: v.clone() for k, v in trainer.policy.master.state_dict().items()}
        param = next(p for n, p in trainer.compute.named_parameters() if "layers.0.mlp" in n)
        handle = param.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        result = trainer.step(0)
        handle.remove()
        assert result.row["skipped"] and result.row["skipped_total"] == 1
        assert result.row["loss_scale"] == 2.0**15
        assert all(torch.equal(trainer.policy.master.state_dict()[k], v) for k, v in before.items())
        assert not trainer.step(1).row["skipped"]
    finally:
        trainer.close()


def test_loss_scaler_grows_after_an_interval_of_good_steps():
    scaler = DynamicLossScaler(enabled=True, init_scale=8.0, interval=2)
    grads = [torch.tensor([16.0, -8.0])]
    assert scaler.unscale_(grads) and grads[0].tolist() == [2.0, -1.0]
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale == 16.0
    assert not scaler.unscale_([torch.tensor([float("nan")])])
    scaler.update(False)
    assert scaler.scale == 8.0 and scaler.skipped == 1
    off = DynamicLossScaler(enabled=False)
    off.update(False)
    assert off.scale == 1.0 and off.skipped == 1


def test_ctrl_c_ends_the_run_cleanly_with_what_it_has(tiny_model, tmp_path):
    def interrupt(row):
        if row["step"] == 1:
            raise KeyboardInterrupt

    config = TrainConfig(
        model=str(tiny_model),
        engine="hf",
        dtypes="bf16",
        out=tmp_path,
        steps=5,
        prompts_per_step=2,
        group_size=2,
        max_tokens=6,
    )
    summary = train_one(config, "bf16", tmp_path, on_step=interrupt)
    assert summary["interrupted"] and not summary["complete"] and summary["steps_done"] == 2
    assert len(pd.read_parquet(tmp_path / "metrics.parquet")) == 2
    assert (tmp_path / "checkpoint-final" / "model.safetensors").is_file()


@pytest.mark.engine
def test_train_compare_cli_writes_both_runs_and_one_report(tiny_model, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            str(tiny_model),
            "--engine",
            "vllm",
            "--compare",
            "bf16,fp16",
            "--steps",
            2,
            "--prompts-per-step",
            2,
            "--group-size",
            2,
            "--max-tokens",
            8,
            "--save-every",
            1,
            "--no-step0-check",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    for dtype in ("bf16", "fp16"):
        metrics = pd.read_csv(tmp_path / dtype / "metrics.csv")
        assert list(metrics["step"]) == [0, 1]
        assert {
            "reward_mean",
            "accuracy",
            "k1",
            "k3",
            "mean_abs_dp",
            "max_abs_dp",
            "min_ratio",
            "max_ratio",
            "grad_norm",
            "loss_scale",
            "skipped_total",
            "entropy",
            "response_len",
            "step_time",
        } <= set(metrics.columns)
        assert (tmp_path / dtype / "checkpoint-1" / "config.json").is_file()
        assert json.loads((tmp_path / dtype / "summary.json").read_text())["complete"]
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "BF16&#39;s k3 was above FP16&#39;s at" in html
    assert 'id="impact"' in html  # step 0's (--impact-every 10); no advantage on the tiny model: no figure
    assert "bf16 step   0" in result.output and "fp16 step   1" in result.output
    (tmp_path / "report.html").unlink()
    rebuilt = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert (tmp_path / "report.html").read_text() == html

    # a train run folder is an `analyze` input: the same k3 per step as the loop logged
    analyzed = CliRunner().invoke(app, ["analyze", str(tmp_path / "bf16"), "--out", str(tmp_path / "analyzed")])
    assert analyzed.exit_code == 0, analyzed.output
    steps = pd.read_parquet(tmp_path / "analyzed" / "steps.parquet")
    logged = pd.read_csv(tmp_path / "bf16" / "metrics.csv")
    assert steps["step"].tolist() == [0, 1] and steps["k3"].to_numpy() == pytest.approx(
        logged["k3"].to_numpy(), rel=1e-9
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--algo", "ppo2"], "unknown --algo"),
        (["--group-size", "1"], "--group-size must be at least 2"),
        (["--compare", "bf16,fp8"], "unknown dtype fp8"),
    ],
)
def test_train_bad_options(args, message, tmp_path):
    result = CliRunner().invoke(app, ["train", *args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and message in result.output


@pytest.mark.engine
def test_sleep_mode_on_a_cpu_is_vllms_own_one_line_refusal(tiny_model, tmp_path):
    """vLLM 0.32 offers sleep mode on CUDA, ROCm and XPU only: `--sleep` here ends at engine start, in one line."""
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            str(tiny_model),
            "--engine",
            "vllm",
            "--sleep",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert result.exit_code == 2 and "Sleep mode is not supported on current platform" in result.output


GIB = 2**30


def test_engine_share_refuses_in_one_line_when_the_policy_leaves_the_engine_nothing():
    """A 7B full fine-tune on an 80 GB GPU (the policy loaded: 28 GB masters + 14 GB BF16 copy; AdamW and
    grads to come): the share was a silent 0.0, then 0.85 at the engine; now one line with the numbers."""
    seven_b = PolicyMemory(masters=28 * GIB, compute=14 * GIB, optimizer=98 * GIB, weights=14 * GIB)
    with pytest.raises(EngineError) as refused:
        share_left(38 * GIB, 80 * GIB, seven_b)
    message = str(refused.value)
    assert "needs 140.0 GiB of the GPU's 80.0 GiB" in message and "AdamW + grads 98.0" in message
    assert "--lora-rank" in message and "\n" not in message
    small = PolicyMemory(masters=2 * GIB, compute=1 * GIB, optimizer=7 * GIB, weights=1 * GIB)
    assert share_left(77 * GIB, 80 * GIB, small) == round(0.9 * 70 / 80, 3)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_policy_memory_counts_masters_compute_copy_and_optimizer(dtype, tiny_model):
    policy = FullPolicy(tiny_model, dtype, torch.device("cpu"))
    numel = sum(p.numel() for p in policy.master.parameters())
    memory = policy_memory(policy)
    copy = 0 if dtype == "fp32" else 2 * numel  # an FP32 run computes in its masters
    assert (memory.masters, memory.compute, memory.weights) == (4 * numel, copy, copy or 4 * numel)
    assert memory.optimizer == 3 * 4 * numel + copy  # two AdamW moments, FP32 grads, the copy's grads


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_the_compute_copy_scores_exactly_as_the_scans_trainer(dtype, tiny_model):
    """The 16-bit copy of the FP32 master keeps RoPE's inv_freq in FP32, as `load_trainer` does: train's
    π_θ′ at step 0 is the scan's π, token for token (`Module.to` rounded the buffer: up to 0.05 apart)."""
    from mismatch.records import Rollout

    policy = FullPolicy(tiny_model, dtype, torch.device("cpu"))
    rollouts = [
        Rollout(
            prompt_index=0,
            sample_index=0,
            prompt_ids=list(range(5, 25)),
            response_ids=list(range(30, 94)),
            logp_engine=[0.0] * 64,
            finish_reason="length",
        )
    ]
    scanned = rescore(load_trainer(tiny_model, dtype), dtype, rollouts, 1.0)["logp_trainer"][0]
    copied = rescore(policy.compute, dtype, rollouts, 1.0)["logp_trainer"][0]
    assert np.array_equal(copied, scanned)
    assert {b.dtype for b in policy.compute.buffers() if b.is_floating_point()} == {torch.float32}
