"""A PEFT LoRA adapter as each side applies it: the engine through a LoRA request (vLLM) or PEFT
(the hf engine), the trainer through PEFT, and both through the base weights with it merged in.

PEFT keeps the adapter's weights in FP32 under a BF16/FP16 base (`autocast_adapter_dtype`) and
computes the low-rank path in FP32 before adding it to the layer's output in the base dtype; vLLM
keeps them in the model dtype. That difference is part of the gap a LoRA run trains through.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mismatch.errors import ConfigError, ModelError, first_line

ADAPTER_CONFIG = "adapter_config.json"
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks (0.32)


@dataclass(frozen=True)
class Adapter:
    path: Path
    rank: int  # the largest rank of any module (rank_pattern included)
    alpha: float
    target_modules: list[str] = field(default_factory=list)


def read_adapter(path: Path) -> Adapter:
    """The adapter folder's settings, refusing what is not a plain LoRA adapter both sides can run."""
    config_file = Path(path) / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ConfigError(
            f"--lora {path}: not a PEFT adapter folder (no {ADAPTER_CONFIG}); "
            "pass the folder PeftModel.save_pretrained wrote"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--lora {path}: {ADAPTER_CONFIG} is not valid JSON ({exc.msg} at line {exc.lineno})"
        ) from None
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"--lora {path}: a {config.get('peft_type')} adapter; only LoRA adapters are supported")
    for flag, name in (("use_dora", "DoRA"), ("use_qalora", "QA-LoRA")):
        if config.get(flag):
            raise ConfigError(f"--lora {path}: {name} adapters are not supported (vLLM runs plain LoRA only)")
    if config.get("modules_to_save"):
        raise ConfigError(
            f"--lora {path}: modules_to_save {config['modules_to_save']} (fully trained modules) is not supported; "
            "merge them into the base model first"
        )
    rank = max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])
    vllm_max_rank(rank, f"--lora {path}: rank {rank}")
    targets = config.get("target_modules") or []
    return Adapter(
        Path(path),
        rank,
        float(config.get("lora_alpha", 8)),
        sorted(targets) if isinstance(targets, list) else [targets],
    )


# vLLM serves a LoRA through the punica wrapper its platform names (`get_punica_wrapper` in
# vllm/lora/punica_wrapper/punica_selector.py; read in 0.32 and in vLLM's main branch). CUDA and ROCm name this
# one, Punica's Triton kernels, whose shrink asserts fp16/bf16 inputs and weights
# (vllm/lora/ops/triton_ops/lora_shrink_op.py, `_lora_shrink`); the CPU wrapper's torch ops take fp32 too.
TRITON_PUNICA = "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU"
TRITON_LORA_DTYPES = ("fp16", "bf16")


def lora_refusals(punica_wrapper: str, dtypes: list[str]) -> dict[str, str]:
    """dtype → reason, for each dtype the LoRA kernels behind `punica_wrapper` (vLLM's platform fact) do not
    take; decided by the kernels the platform selects, not by its name."""
    if punica_wrapper != TRITON_PUNICA:
        return {}
    return {
        dtype: f"vLLM's LoRA kernels here ({punica_wrapper.rsplit('.', 1)[-1]}, Punica's Triton kernels) take "
        f"{' and '.join(TRITON_LORA_DTYPES)} only"
        for dtype in dtypes
        if dtype not in TRITON_LORA_DTYPES
    }


def vllm_max_rank(rank: int, what: str = "the LoRA rank") -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds `rank`; ConfigError naming `what` if none does."""
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        raise ConfigError(f"{what} is above vLLM's largest max_lora_rank ({VLLM_MAX_LORA_RANKS[-1]})")
    return next(allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= rank)


def with_adapter(model, adapter: Path):
    """`model` with the adapter's LoRA layers injected by PEFT (FP32 adapter weights), returned as
    the transformers model itself, so everything that runs a causal LM runs it unchanged."""
    return _peft_model(model, adapter).base_model.model


def _peft_model(model, adapter: Path):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as exc:  # another base's shapes or module names
        reason = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), first_line(exc))
        raise ModelError(f"--lora {adapter}: PEFT cannot apply it to this model: {reason}") from None


def adapter_weights(path: Path) -> dict:
    """The adapter's saved tensors under the names its LoRA layers have inside the transformers model
    (`...q_proj.lora_A.weight` → `...q_proj.lora_A.default.weight`), for `load_weights`."""
    from safetensors.torch import load_file

    saved = load_file(str(Path(path) / "adapter_model.safetensors"))
    return {
        name.removeprefix("base_model.model.")
        .replace(".lora_A.", ".lora_A.default.")
        .replace(".lora_B.", ".lora_B.default."): tensor
        for name, tensor in saved.items()
    }


def new_adapter(model, rank: int, alpha: float, target_modules: list[str]):
    """A fresh trainable LoRA on `model` (PEFT's init: B = 0, so the policy starts as the base),
    its weights in the model's dtype (the compute copy; the loop keeps FP32 masters). Target
    modules are PEFT's names, or "all-linear". Returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    if target_modules != ["all-linear"]:
        present = linear_names(model)
        if missing := [t for t in target_modules if t not in present]:
            raise ConfigError(
                f"--lora-target-modules: {', '.join(missing)} not in this model; "
                f"its linear layers: {', '.join(sorted(present))} (or all-linear)"
            )
    targets = "all-linear" if target_modules == ["all-linear"] else list(target_modules)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT annotates an int; it scales by alpha / r, a float too
        target_modules=targets,
        lora_dropout=0.0,
    )
    return get_peft_model(model, config, autocast_adapter_dtype=False)


def linear_names(model) -> set[str]:
    import torch

    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def adapter_gap(lora_pairs: Sequence[Mapping[str, Any]], merged_pairs: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Per pair scanned both ways: k3 and mean |Δp| with the adapter applied by each side, and with
    it merged into the weights; `k3_ratio` = k3_lora / k3_merged. `adapter_path` says whether the
    adapter path adds mismatch: "adds" (or "removes") when the two k3 intervals do not overlap,
    "no_difference" otherwise."""
    merged = {(p["engine_dtype"], p["trainer_dtype"]): p for p in merged_pairs}
    rows = []
    for lora in lora_pairs:
        other = merged.get((lora["engine_dtype"], lora["trainer_dtype"]))
        if other is None:
            continue
        if lora["k3_ci_low"] > other["k3_ci_high"]:
            verdict = "adds"
        elif lora["k3_ci_high"] < other["k3_ci_low"]:
            verdict = "removes"
        else:
            verdict = "no_difference"
        rows.append(
            {"engine_dtype": lora["engine_dtype"], "trainer_dtype": lora["trainer_dtype"]}
            | {
                f"{metric}_{side}": pair[metric]
                for side, pair in (("lora", lora), ("merged", other))
                for metric in ("k3", "k3_ci_low", "k3_ci_high", "mean_abs_dp")
            }
            | {"k3_ratio": lora["k3"] / other["k3"] if other["k3"] > 0 else None, "adapter_path": verdict}
        )
    return rows


def merge_into(base: Path, adapter: Path, folder: Path, trust_remote_code: bool = False) -> Path:
    """The base model with the adapter merged into its weights in FP32 (W + B·A·α/r), saved with the
    base's tokenizer and generation config: the same function without the adapter path."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from mismatch.model.loading import load_causal_lm

    merged = _peft_model(
        load_causal_lm(base, torch.float32, trust_remote_code=trust_remote_code), adapter
    ).merge_and_unload()
    merged.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code).save_pretrained(folder)
    try:
        GenerationConfig.from_pretrained(base).save_pretrained(folder)
    except OSError:  # the base has none
        pass
    return folder
