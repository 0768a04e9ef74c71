"""What the learner trains, and how the live engine is brought up to date after a step.

Both kinds keep FP32 masters (what the optimiser steps) apart from the compute model in --dtype
(what runs forward and backward), as FSDP / DeepSpeed mixed precision does:
- full fine-tuning: the whole model's FP32 master, a compute copy in --dtype; the engine gets the
  master's weights in place (`load_weights`);
- LoRA: the base frozen in --dtype, a PEFT adapter computing in --dtype with FP32 masters of its
  weights; the engine gets the adapter saved as a folder and applies it as a new LoRA request
  (`load_adapter`), as verl and slime serve LoRA policies, without a restart.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mismatch.model.lora import new_adapter
from mismatch.model.precision import DTYPES
from mismatch.model.rescore import load_trainer

PEFT_PREFIX = "base_model.model."  # the PeftModel's names of the inner model's parameters


class FullPolicy:
    kind = "full"

    def __init__(self, model_path: Path, dtype: str, device: torch.device):
        self.master = load_trainer(model_path, "fp32", device=device)
        self.compute = self.master if dtype == "fp32" else compute_copy(self.master, DTYPES[dtype])
        self.masters = dict(self.master.named_parameters())

    def engine_options(self) -> dict:
        return {}

    def sync_engine(self, engine) -> None:
        engine.load_weights({name: t.detach() for name, t in self.master.state_dict().items()})

    def save(self, folder: Path) -> None:
        self.master.save_pretrained(folder)

    def close(self) -> None:
        pass


def compute_copy(master, dtype: torch.dtype):
    """The master with its parameters in `dtype` and its buffers as they are: `load_trainer` in a 16-bit
    dtype keeps RoPE's `inv_freq` in FP32 (as transformers computes it), and so must the copy, or its
    log-probs drift from the scan's by up to ~0.05 per token (`Module.to` would round the buffers too)."""
    compute = copy.deepcopy(master)
    for param in compute.parameters():
        param.data = param.data.to(dtype)
    return compute


class LoraPolicy:
    """A PEFT LoRA on the frozen base. Adapter folders for the engine are written under `live`
    (one per sync; the one before is removed once the engine has moved on)."""

    kind = "lora"

    def __init__(
        self,
        model_path: Path,
        dtype: str,
        device: torch.device,
        *,
        rank: int,
        alpha: float,
        target_modules: list[str],
        live: Path,
    ):
        base = load_trainer(model_path, dtype, device=device)
        self.peft = new_adapter(base, rank, alpha, target_modules)
        self.compute = self.peft.base_model.model  # the transformers model, LoRA layers inside
        trainable = {name: p for name, p in self.compute.named_parameters() if p.requires_grad}
        self.masters = (
            trainable
            if dtype == "fp32"
            else {name: torch.nn.Parameter(p.detach().float().clone()) for name, p in trainable.items()}
        )
        self.live = live
        self.version = 0
        self.save(self._folder())

    def _folder(self) -> Path:
        return self.live / f"adapter-{self.version}"

    def engine_options(self) -> dict:
        return {"lora": self._folder()}

    def sync_engine(self, engine) -> None:
        self.version += 1
        self.save(self._folder())
        engine.load_adapter(self._folder())
        shutil.rmtree(self.live / f"adapter-{self.version - 2}", ignore_errors=True)  # the engine has moved past it

    def save(self, folder: Path) -> None:
        """The adapter with its FP32 master weights, as PeftModel.save_pretrained writes it."""
        self.peft.save_pretrained(
            folder, state_dict={PEFT_PREFIX + name: p.detach() for name, p in self.masters.items()}
        )

    def close(self) -> None:
        shutil.rmtree(self.live, ignore_errors=True)


@dataclass(frozen=True)
class PolicyMemory:
    """Bytes of a policy on its device."""

    masters: int  # the FP32 masters
    compute: int  # the compute model's own tensors (none of a full FP32 run's: its masters compute)
    optimizer: int  # allocated at the first step: AdamW's two moments, the masters' and the compute copy's grads
    weights: int  # the model in --dtype: what the engine loads too

    @property
    def total(self) -> int:
        return self.masters + self.compute + self.optimizer


def policy_memory(policy) -> PolicyMemory:
    masters = list(policy.masters.values())
    own = {id(p) for p in masters}
    compute = list(policy.compute.parameters())
    master_bytes = sum(_bytes(p) for p in masters)
    separate_grads = sum(_bytes(p) for p in compute if p.requires_grad and id(p) not in own)
    return PolicyMemory(
        masters=master_bytes,
        compute=sum(_bytes(p) for p in compute if id(p) not in own),
        optimizer=3 * master_bytes + separate_grads,
        weights=sum(_bytes(p) for p in compute),
    )


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def parameter_counts(policy) -> dict:
    """Trainable (the masters) and total parameters of the compute model, and the optimiser's
    FP32 state (AdamW: two moments per trainable parameter)."""
    trainable = sum(p.numel() for p in policy.masters.values())
    return {
        "policy": policy.kind,
        "trainable_parameters": trainable,
        "parameters": sum(p.numel() for p in policy.compute.parameters()),
        "optimizer_state_mib": round(2 * 4 * trainable / 2**20, 3),
    }
