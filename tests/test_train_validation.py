"""`train --seeds N`: the (seed, dtype) layout, the seeds pairing the dtypes, validation.json and the report
rebuilt from the folders; the gradient impact at the chosen steps; the step-0 check against a real scan."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from mismatch import runs
from mismatch.cli import app
from mismatch.commands.train import Trainer
from mismatch.config import TrainConfig
from mismatch.stats.metrics import pair_metrics
from mismatch.stats.validation import k3_clusters, step0_check

TINY_RUN = ("--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--max-tokens", "6", "--engine", "hf")
TINY_RUN += ("--prompts", "builtin:arithmetic")  # whatever the default set: the tiny model earns no reward anyway


def train(tiny_model, out, *args):
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_model), *TINY_RUN, *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result


def test_a_seed_pairs_the_dtypes_same_prompts_and_data_order_and_sampling_seeds(tiny_model, tmp_path):
    config = TrainConfig(
        model=str(tiny_model),
        engine="hf",
        dtypes="bf16,fp16",
        out=tmp_path,
        seed=5,
        seeds=2,
        num_prompts=16,
        prompts=Path("builtin:arithmetic"),
    )
    order = {}
    for seed in config.seed_list():
        for dtype in config.dtypes:
            trainer = Trainer(replace(config, seed=seed), dtype)  # as run_training builds each run
            order[seed, dtype] = (trainer.tasks, [trainer.batch_indices(step) for step in range(4)])
            trainer.close()
    assert config.seed_list() == [5, 6]
    assert order[5, "bf16"] == order[5, "fp16"] and order[6, "bf16"] == order[6, "fp16"]
    assert order[5, "bf16"] != order[6, "bf16"]


def test_train_layout_and_train_runs_read_each_other(tmp_path):
    assert runs.train_layout(tmp_path, ["bf16"], [0]) == {(0, "bf16"): tmp_path}
    assert runs.train_layout(tmp_path, ["bf16", "fp16"], [3]) == {
        (3, "bf16"): tmp_path / "bf16",
        (3, "fp16"): tmp_path / "fp16",
    }
    layout = runs.train_layout(tmp_path, ["fp16", "bf16"], [1, 2])
    assert list(layout) == [(1, "fp16"), (1, "bf16"), (2, "fp16"), (2, "bf16")]  # seed-major: pairs finish together
    assert layout[2, "bf16"] == tmp_path / "seed-2" / "bf16"
    for (seed, dtype), folder in reversed(layout.items()):
        folder.mkdir(parents=True)
        config = {"seed": seed, "dtype": dtype, "dtypes": ["fp16", "bf16"]}
        (folder / runs.SUMMARY).write_text(json.dumps({"kind": "train", "config": config}))
    (tmp_path / "seed-1" / "bf16" / runs.STEP0_SCAN).mkdir()
    (tmp_path / "seed-1" / "bf16" / runs.STEP0_SCAN / runs.SUMMARY).write_text(json.dumps({"kind": "scan"}))
    assert runs.train_runs(tmp_path) == layout  # the --compare order, whatever the folders' names sort as
    assert runs.folder_kind(tmp_path) == "train"


@pytest.mark.slow
def test_seeds_pair_the_dtypes_and_the_report_rebuilds_from_the_folders(tiny_model, tmp_path):
    result = train(tiny_model, tmp_path, "--compare", "bf16,fp16", "--seeds", "2", "--seed", "5", "--no-step0-check")
    assert "bf16 seed 5 step   0" in result.output and "fp16 seed 6 step   1" in result.output
    for seed in (5, 6):
        for dtype in ("bf16", "fp16"):
            folder = tmp_path / f"seed-{seed}" / dtype
            summary = json.loads((folder / runs.SUMMARY).read_text())
            assert summary["complete"] and summary["config"]["seed"] == seed and summary["config"]["seeds"] == 2
            # --impact-every 10 (the default): step 0 only, before the update
            assert [m["step"] for m in summary["impact"]] == [0]
            assert [json.loads(line)["step"] for line in (folder / runs.IMPACT).read_text().splitlines()] == [0]
            steps = pd.read_parquet(folder / runs.STEP_METRICS)
            assert steps.loc[0, "impact_time"] > 0 and steps.loc[1, "impact_time"] == 0
    validation = json.loads((tmp_path / runs.VALIDATION).read_text())
    assert validation["seeds"] == [5, 6] and validation["dtypes"] == ["bf16", "fp16"] and validation["window"] == [0, 1]
    accuracy = next(d for d in validation["differences"] if d["metric"] == "accuracy")
    assert accuracy["seeds"] == [5, 6] and accuracy["first"] == "bf16" and accuracy["second"] == "fp16"
    window = {
        (seed, dtype): pd.read_parquet(tmp_path / f"seed-{seed}" / dtype / runs.STEP_METRICS)["accuracy"].mean()
        for seed in (5, 6)
        for dtype in ("bf16", "fp16")
    }
    per_seed = [window[s, "fp16"] - window[s, "bf16"] for s in (5, 6)]
    assert accuracy["per_seed"] == pytest.approx(per_seed)
    assert accuracy["estimate"] == pytest.approx(sum(per_seed) / 2)
    if per_seed[0] != per_seed[1]:  # two seeds: t on 1 degree of freedom
        half = 12.706204736174707 * abs(per_seed[0] - per_seed[1]) / 2
        assert (accuracy["low"], accuracy["high"]) == pytest.approx(
            (accuracy["estimate"] - half, accuracy["estimate"] + half)
        )
        assert accuracy["established"] == (not accuracy["low"] <= 0 <= accuracy["high"])

    html = (tmp_path / runs.REPORT_HTML).read_text()
    assert 'id="validation"' in html and 'id="impact"' in html and "2 seeds" in html
    (tmp_path / runs.REPORT_HTML).unlink()
    rebuilt = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert (tmp_path / runs.REPORT_HTML).read_text() == html


@pytest.mark.slow
def test_one_seed_keeps_the_layout_and_the_step0_check_scans_step_0s_prompts(tiny_model, tmp_path):
    train(tiny_model, tmp_path, "--dtype", "bf16", "--impact-every", "0")
    summary = json.loads((tmp_path / runs.SUMMARY).read_text())  # one dtype, one seed: the root is the run
    assert "impact" not in summary and not (tmp_path / runs.IMPACT).exists()
    check = summary["step0_check"]
    scan_dir = tmp_path / runs.STEP0_SCAN
    scanned = runs.load_scan(scan_dir)
    assert scanned.summary["config"]["samples"] == 2 and scanned.summary["config"]["sampling"]["max_tokens"] == 6
    assert [p["engine_dtype"] + "→" + p["trainer_dtype"] for p in scanned.pairs] == ["bf16→bf16"]
    # the scan's prompts are step 0's, answers kept; its sample is another than train's
    tokens = pd.read_parquet(tmp_path / runs.TOKENS)
    step0 = tokens[tokens["step"] == 0]
    prompts = [json.loads(line) for line in (tmp_path / "step0-prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 2 and all(p["answer"] for p in prompts)
    assert scanned.summary["config"]["sampling"]["seed"] == check["sampling_seed"] != 0
    # the same statistics as the scan: its k3 and interval recomputed from its tokens, and train's step-0 k3
    pair = scanned.pairs[0]
    assert (check["scan_k3"], check["scan_low"], check["scan_high"]) == pytest.approx(
        (pair["k3"], pair["k3_ci_low"], pair["k3_ci_high"]), rel=1e-9
    )
    logged = pd.read_parquet(tmp_path / runs.STEP_METRICS).loc[0, "k3"]
    assert check["train_k3"] == pytest.approx(logged, rel=1e-9)
    ours = pair_metrics(
        step0["logp_trainer"],
        step0["logp_engine"],
        step0["seq_id"],
        prompt_ids=step0["prompt_index"],
        seed=check["sampling_seed"],
    )
    assert (check["train_low"], check["train_high"]) == pytest.approx((ours["k3_ci_low"], ours["k3_ci_high"]))
    again = step0_check(
        "bf16",
        k3_clusters(step0["logp_trainer"], step0["logp_engine"], step0["prompt_index"]),
        k3_clusters(scanned.tokens["logp_trainer"], scanned.tokens["logp_engine"], scanned.tokens["prompt_index"]),
        seed=check["sampling_seed"],
    )
    assert check["agrees"] == again["agrees"] == (check["low"] <= 0 <= check["high"])
    html = (tmp_path / runs.REPORT_HTML).read_text()
    assert "Step-0 check (bf16)" in html and "one seed: no interval" not in html  # one dtype: nothing to compare
    assert math.isfinite(check["difference"])


def estimate(value, low=None, high=None):
    return {"value": value, "low": low, "high": high}


def fake_run(folder, *, seed, dtype, accuracy, k3, impact=()):
    """A finished train run folder written by hand: metrics with the given accuracy per step, μ = π tokens."""
    steps = len(accuracy)
    folder.mkdir(parents=True)
    config = {"model": "m", "engine": "hf", "seed": seed, "dtype": dtype, "dtypes": ["bf16", "fp16"], "steps": steps}
    config |= {"algo": "grpo", "lr": 1e-5, "grad_clip": 1.0, "prompts_per_step": 2, "group_size": 2}
    config |= {"max_tokens": 4, "temperature": 1.0}
    summary = {"format_version": runs.FORMAT_VERSION, "kind": "train", "complete": True, "config": config}
    (folder / runs.SUMMARY).write_text(json.dumps(summary | {"impact": list(impact)}))
    frame = pd.DataFrame(
        {"step": range(steps), "reward_mean": accuracy, "accuracy": accuracy, "k3": k3, "skipped": False}
    )
    frame.to_parquet(folder / runs.STEP_METRICS)
    tokens = pd.DataFrame(
        {"step": [0, 0, steps - 1, steps - 1], "seq_id": [0, 1, 0, 1], "position": 0, "prompt_index": [0, 1, 0, 1]}
    )
    tokens = tokens.assign(token_id=5, logp_engine=-1.0, logp_trainer=-1.1, engine_dtype=dtype, trainer_dtype=dtype)
    tokens.to_parquet(folder / runs.TOKENS)


def impact_at(step, ratio, star):
    return {
        "step": step,
        "measurable": True,
        "reason": None,
        "sequences": 4,
        "share_groups_with_signal": 1.0,
        "rho_ess": 0.99,
        "bias_to_noise": estimate(ratio, ratio / 2, ratio * 2),
        "batch_star": estimate(star, star / 3, star * 3),
        "batch_star_at_least": None,
    }


def test_the_report_calls_established_only_what_the_interval_excludes(tmp_path):
    """Accuracy: FP16 above BF16 at both seeds by 0.2 and 0.3 → on 1 dof the interval is 0.25 ± 12.7·0.05
    and contains 0: not established. k3: FP16's 100× below at both seeds (s = 0): established."""
    for seed, gain in ((0, 0.2), (1, 0.3)):
        for dtype, shift, k3 in (("bf16", 0.0, 1e-3), ("fp16", gain, 1e-5)):
            impact = [impact_at(0, 0.5, 16.0), impact_at(5, 0.8, 6.0)] if dtype == "bf16" else []
            fake_run(
                tmp_path / f"seed-{seed}" / dtype,
                seed=seed,
                dtype=dtype,
                accuracy=[0.1] * 5 + [0.1 + shift] * 5,
                k3=k3,
                impact=impact,
            )
    written = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert written.exit_code == 0, written.output
    html = (tmp_path / runs.REPORT_HTML).read_text().replace("&#39;", "'")
    assert "fp16 − bf16 in accuracy: +0.250 over the final window (steps 5–9), 2 paired seeds" in html
    half = 12.706204736174707 * 0.05
    assert (
        f"(95% interval {0.25 - half:+.3f} to {0.25 + half:+.3f}): not established: the 95% interval contains 0" in html
    )
    assert "fp16's k3 is 0.01× bf16's" in html and "established: the 95% interval excludes 1" in html
    assert (
        "bf16, step 0: at a batch of 4 sequences the bias is 50% of one step's noise (95% interval 25%–100%);"
        " they are equal at B* ≈ 16 [5.33, 48]" in html
    )
    assert html.count("data:image/png;base64,") == 4  # curves, impact, two scatters
