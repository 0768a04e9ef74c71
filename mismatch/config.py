"""Scan settings as plain values, and which (engine dtype, trainer dtype) pairs a scan measures."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from mismatch.engines.base import Sampling

REFERENCE_DTYPE = "fp32"
DEFAULT_NUM_PROMPTS = 64  # for the built-in arithmetic set; a prompt file is used whole


@dataclass
class ScanConfig:
    model: str
    engine: str
    dtypes: list[str]  # engine dtypes
    out: Path
    sampling: Sampling = field(default_factory=Sampling)
    all_pairs: bool = False
    prompts: Path | None = None
    num_prompts: int | None = None
    samples: int = 1
    chat_template: bool = True
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    trust_remote_code: bool = False
    fail_on: list[str] = field(default_factory=list)  # CI gate conditions (mismatch.gate)
    strict: bool = False  # fail, instead of skipping, on prompts that do not fit the context

    def pairs(self) -> list[tuple[str, str]]:
        """Each engine dtype against itself and FP32 (or against every dtype with `all_pairs`)."""
        trainers = list(dict.fromkeys([*self.dtypes, REFERENCE_DTYPE]))
        return [(e, t) for e in self.dtypes for t in (trainers if self.all_pairs else dict.fromkeys([e, REFERENCE_DTYPE]))]

    def to_json(self) -> dict:
        data = asdict(self)
        data["out"], data["prompts"] = str(self.out), self.prompts and str(self.prompts)
        data["pairs"] = [list(p) for p in self.pairs()]
        return data
