"""The trainer side on a GPU, against this project's CPU paths, on the same tokens (issue 21, item 5).

`python bench/gpu_trainer.py OUT_DIR` on a machine with a CUDA GPU and torch / transformers (vLLM
not needed): on two random models built from a config (the tests' tiny Qwen2 and a wider 8-layer
one), the HF engine generates on the GPU in BF16; the same tokens are rescored on the GPU in FP32,
BF16 and native FP16, and on the CPU in FP32 and in each 16-bit dtype the way `mismatch` computes it
there (`precision.compute_context`: FP16 as FP32 GEMMs over FP16 values rounded to FP16; BF16 natively
where the CPU multiplies BF16, else emulated; attention rounded as FlashAttention), and plainly (the
CPU's own 16-bit ops, no compute context) for contrast. For each 16-bit dtype it prints max and mean
|Δ log p| of CPU against GPU, beside the GPU's own 16-bit against FP32 gap. Then one `train --engine
hf --compare bf16,fp16` run of two steps on the GPU. Results go to OUT_DIR/gpu_trainer.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bf16_paths import kernel_path  # the CPU's BF16 paths, as issue 19's check selects them

from mismatch.engines.hf_engine import HFEngine
from mismatch.inputs.prompts import arithmetic_prompts, encode_prompts
from mismatch.model import precision
from mismatch.model.loading import load_tokenizer
from mismatch.model.rescore import load_trainer, rescore
from mismatch.model.tiny import build_tiny
from mismatch.records import Sampling
from mismatch.stats.metrics import pair_metrics

SAMPLING = Sampling(temperature=1.0, max_tokens=64, seed=0)
PROMPTS = 32
SAMPLES = 2


def build_wide(folder: Path) -> Path:
    """An 8-layer Qwen2 of width 1024 (random, seed 0) with the tiny tokenizer: longer sums per GEMM."""
    return build_tiny(
        folder,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        initializer_range=0.02,  # transformers' default
    )


def scores(model: Path, dtype: str, device: str, rollouts) -> np.ndarray:
    trainer = load_trainer(model, dtype, device=torch.device(device))
    logp = rescore(trainer, dtype, rollouts, SAMPLING.temperature)["logp_trainer"]
    del trainer
    torch.cuda.empty_cache()
    return np.concatenate(logp)


def gap(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    d = np.abs(a - b)
    return {"max": float(d.max()), "mean": float(d.mean())}


def k3(logp: np.ndarray, reference: np.ndarray, rollouts) -> str:
    """The trainer-only k3 of `logp` against `reference` with its bootstrap interval over prompts."""
    seq_ids = np.concatenate([[i] * len(r.response_ids) for i, r in enumerate(rollouts)])
    prompts = np.concatenate([[r.prompt_index] * len(r.response_ids) for r in rollouts])
    m = pair_metrics(logp, reference, seq_ids, prompt_ids=prompts)
    return f"{m['k3']:.3e} [{m['k3_ci_low']:.3e}, {m['k3_ci_high']:.3e}]"


def gpu_fp16_full_reductions(model: Path, rollouts) -> np.ndarray:
    """The GPU's FP16 with cuBLAS's reduced-precision reductions off (PyTorch allows them by default)."""
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    try:
        return scores(model, "fp16", "cuda", rollouts)
    finally:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True


def compare(model: Path) -> dict:
    tokenizer = load_tokenizer(model)
    prompt_ids = encode_prompts(tokenizer, arithmetic_prompts(PROMPTS, seed=0))
    started = time.perf_counter()
    engine = HFEngine(model, "bf16")
    rollouts = engine.generate(prompt_ids, SAMPLES, SAMPLING)
    generate_s = time.perf_counter() - started
    del engine
    gpu = {d: scores(model, d, "cuda", rollouts) for d in ("fp32", "bf16", "fp16")}
    gpu["fp16 full reductions"] = gpu_fp16_full_reductions(model, rollouts)
    cpu = {"fp32": scores(model, "fp32", "cpu", rollouts), "fp16": scores(model, "fp16", "cpu", rollouts)}
    with kernel_path("plain"):
        cpu["fp16 plain"] = scores(model, "fp16", "cpu", rollouts)
    for path in ("native", "emulated", "plain"):
        if path == "native" and not precision.native_bf16():
            continue
        with kernel_path(path):
            cpu[f"bf16 {path}"] = scores(model, "bf16", "cpu", rollouts)
    rows: dict = {"tokens": int(len(gpu["fp32"])), "hf_engine_generate_s": round(generate_s, 2)}
    rows["fp32: cpu vs gpu"] = gap(cpu["fp32"], gpu["fp32"])
    for name, logp in gpu.items():
        if name != "fp32":
            rows[f"gpu {name} vs gpu fp32"] = gap(logp, gpu["fp32"]) | {"k3": k3(logp, gpu["fp32"], rollouts)}
    for name, logp in cpu.items():
        if name != "fp32":
            rows[f"cpu {name} vs cpu fp32"] = gap(logp, cpu["fp32"]) | {"k3": k3(logp, cpu["fp32"], rollouts)}
            rows[f"cpu {name} vs gpu {name.split()[0]}"] = gap(logp, gpu[name.split()[0]])
    rows["cpu fp16 vs gpu fp16 full reductions"] = gap(cpu["fp16"], gpu["fp16 full reductions"])
    return rows


def train(model: Path, out: Path) -> dict:
    started = time.perf_counter()
    command = [sys.executable, "-c", "from mismatch.cli import app; app()", "train", "--engine", "hf"]
    command += ["--model", str(model), "--compare", "bf16,fp16", "--steps", "2", "--prompts-per-step", "4"]
    command += ["--group-size", "4", "--max-tokens", "32", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    steps = {}
    for dtype in ("bf16", "fp16"):
        metrics = out / dtype / "metrics.csv"
        steps[dtype] = metrics.read_text() if metrics.exists() else None
    return {
        "exit": done.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "metrics": steps,
        "stderr_tail": done.stderr[-1500:],
    }


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_class": precision.cpu_class(),
        "models": {},
    }
    work = Path("/tmp/gpu_trainer")
    work.mkdir(exist_ok=True)
    models = {
        "tiny (2 layers, width 128)": build_tiny(work / "tiny"),
        "wide (8 layers, width 1024)": build_wide(work / "wide"),
    }
    for name, folder in models.items():
        result["models"][name] = compare(folder)
        print(name, json.dumps(result["models"][name], indent=1), flush=True)
    result["train"] = train(models["tiny (2 layers, width 128)"], work / "train")
    print(json.dumps(result["train"], indent=1), flush=True)
    (out / "gpu_trainer.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
