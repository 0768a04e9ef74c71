"""The trainer's BF16 on both CPU paths, on one scan's saved tokens (issue 19's cross-class check).

`python bench/bf16_paths.py RUN_DIR` rescores the BF16 engine's sequences of a scan run folder with
the BF16 trainer three ways: native BF16 GEMMs (what AVX512-BF16 / AMX CPUs run), FP32 GEMMs over
BF16 values (what AVX2-only CPUs run) — both with attention rounded as FlashAttention — and the CPU's
plain BF16 forward (SDPA unrounded, the trainer before issue 19). Each is compared with the FP32
trainer on the same tokens (trainer-only k3) and with the BF16 engine (the scan's bf16 → bf16 pair),
with bootstrap intervals over prompts. The native path runs only where the CPU multiplies BF16.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import numpy as np

from mismatch import runs
from mismatch.model import precision
from mismatch.model import rescore as rescoring
from mismatch.model.rescore import load_trainer, rescore
from mismatch.stats.metrics import pair_metrics


@contextlib.contextmanager
def kernel_path(path: str):
    """Rescoring's BF16 as `path` computes it: "native" or "emulated" GEMMs (flags answered as such a
    CPU's), or "plain" (no compute context: the CPU's own BF16 ops, SDPA unrounded)."""
    flags, context = precision.cpu_flags, rescoring.compute_context
    if path == "plain":
        rescoring.compute_context = lambda dtype, device: contextlib.nullcontext()
    else:
        precision.cpu_flags = lambda: flags() | {"avx512_bf16": path == "native", "amx_bf16": False}
    try:
        yield
    finally:
        precision.cpu_flags, rescoring.compute_context = flags, context


def main(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    temperature = summary["config"]["sampling"]["temperature"]
    rollouts = runs.read_rollouts(run)["bf16"]
    model_path = Path(summary["config"]["model_path"])
    seq_ids = np.concatenate([[i] * len(r.response_ids) for i, r in enumerate(rollouts)])
    prompts = np.concatenate([[r.prompt_index] * len(r.response_ids) for r in rollouts])
    engine = np.concatenate([r.logp_engine for r in rollouts])
    fp32 = np.concatenate(rescore(load_trainer(model_path, "fp32"), "fp32", rollouts, temperature)["logp_trainer"])
    bf16 = load_trainer(model_path, "bf16")
    paths = ["native", "emulated", "plain"] if precision.native_bf16() else ["emulated", "plain"]
    rows = {}
    for path in paths:
        with kernel_path(path):
            logp = np.concatenate(rescore(bf16, "bf16", rollouts, temperature)["logp_trainer"])
        rows[path] = {
            "trainer bf16 vs fp32": pair_metrics(logp, fp32, seq_ids, prompt_ids=prompts),
            "engine bf16 → trainer bf16": pair_metrics(logp, engine, seq_ids, prompt_ids=prompts),
        }
    print(f"CPU class {precision.cpu_class()}; {len(engine)} tokens of {len(rollouts)} sequences from {run}")
    for path, pairs in rows.items():
        for name, m in pairs.items():
            print(
                f"{path:<9} {name:<28} k3 {m['k3']:.3e} [{m['k3_ci_low']:.3e}, {m['k3_ci_high']:.3e}]"
                f"  mean|Δp| {m['mean_abs_dp']:.3e}"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
