"""Dtype names, and 16-bit arithmetic on CPU as a GPU computes it.

A GPU's FP16 or BF16 GEMM multiplies 16-bit inputs exactly, accumulates in FP32 and rounds the
result to the 16-bit type. An FP32 matmul over 16-bit-valued inputs, rounded back, computes the
same thing up to the order of accumulation (16-bit products are exact in FP32). On CPU:

- FP16: without AVX512-FP16 a native FP16 matmul takes a slow path (~150x slower than BF16), so
  the matmul-like ops of an FP16 model always run through FP32 (`GPUNumerics`, emulated matmuls);
- BF16: where the CPU has AVX512-BF16 or AMX, oneDNN's native BF16 GEMMs compute exactly that (and
  fast); elsewhere torch converts BF16 on a slow path, so the matmuls run through FP32 as for FP16.

On both paths attention is rounded as FlashAttention rounds it on a GPU (`flash_attention`);
every other op stays in the model's dtype.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mismatch.records import DTYPE_NAMES

DTYPES: dict[str, torch.dtype] = dict(zip(DTYPE_NAMES, (torch.bfloat16, torch.float16, torch.float32), strict=True))
VLLM_DTYPE_NAMES: dict[str, Literal["bfloat16", "float16", "float32"]] = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp32": "float32",
}


_MATMUL_OPS = {
    F.linear,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.mm,
    torch.Tensor.mm,
    torch.addmm,  # GPT-2's Conv1D
    torch.Tensor.addmm,
    torch.bmm,
    torch.Tensor.bmm,
    torch.baddbmm,
    torch.einsum,
    # MoE experts
    *(op for op in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if op is not None),
}


def flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """16-bit scaled-dot-product attention as FlashAttention computes it on a GPU, in the inputs'
    dtype: scores and their softmax statistics in FP32, the unnormalised probabilities exp(s − max)
    rounded to the 16-bit type before they multiply V (FP32 accumulation), the row sum taken
    unrounded, the output rounded to the 16-bit type. The signature is
    `F.scaled_dot_product_attention`'s, whose calls `GPUNumerics` hands over as they come."""
    dtype = query.dtype
    q = query.float()
    k = key.float()
    v = value.float()
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        rows, cols = scores.shape[-2:]
        scores = scores.masked_fill(
            ~torch.ones(rows, cols, dtype=torch.bool, device=scores.device).tril(cols - rows), float("-inf")
        )
    if attn_mask is not None:
        scores = (
            scores.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else scores + attn_mask.float()
        )
    top = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)  # a fully masked row stays finite
    unnormalised = torch.exp(scores - top)
    total = unnormalised.sum(dim=-1, keepdim=True)
    out = (unnormalised.to(dtype).float() @ v) / total.clamp(min=torch.finfo(torch.float32).tiny)
    return out.to(dtype)


class GPUNumerics(TorchFunctionMode):
    """A forward (and its backward) in a 16-bit `dtype` on CPU computed as a GPU computes it:
    attention as `flash_attention`; with `emulate_matmuls`, the matmul-like ops as FP32 over the
    16-bit inputs, rounded back to `dtype` (else the CPU's native kernels)."""

    def __init__(self, dtype: torch.dtype, emulate_matmuls: bool):
        super().__init__()
        self.dtype = dtype
        self.emulate_matmuls = emulate_matmuls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and _any_of(self.dtype, args, kwargs):
            return flash_attention(*args, **kwargs)  # the mode is off inside its own handler: no recursion
        if self.emulate_matmuls and func in _MATMUL_OPS and _any_of(self.dtype, args, kwargs):
            out = func(*_to_fp32(args, self.dtype), **{k: _to_fp32(v, self.dtype) for k, v in kwargs.items()})
            return out.to(self.dtype)
        return func(*args, **kwargs)


def _any_of(dtype: torch.dtype, args, kwargs) -> bool:
    values = [*args, *kwargs.values()]
    values += [v for a in values if isinstance(a, (list, tuple)) for v in a]  # einsum("…", [a, b])
    return any(isinstance(a, torch.Tensor) and a.dtype == dtype for a in values)


def _to_fp32(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.dtype == dtype:
        return value.float()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_fp32(v, dtype) for v in value)
    return value


CPU_FLAGS = ("avx2", "avx512_f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")  # decide 16-bit speed, kernels


@functools.cache
def cpu_flags() -> dict[str, bool]:
    """The instruction sets among CPU_FLAGS this CPU has (torch's cpuinfo)."""
    found = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return {flag: bool(found.get(flag, False)) for flag in CPU_FLAGS}


def cpu_class() -> str:
    """The CPU class whose kernels (ours and vLLM's) and BF16 numbers differ: AMX, AVX512-BF16, AVX512 or AVX2."""
    flags = cpu_flags()
    names = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16", "avx512_f": "AVX512", "avx2": "AVX2"}
    return next((name for flag, name in names.items() if flags[flag]), "other")


def native_bf16() -> bool:
    """Whether this CPU multiplies BF16 natively (AVX512-BF16 or AMX): exact products, FP32 accumulation."""
    return cpu_flags()["avx512_bf16"] or cpu_flags()["amx_bf16"]


def emulated_matmuls(dtype: str, device: torch.device) -> bool:
    """Whether a forward in `dtype` on `device` runs its matmuls as FP32 over 16-bit values."""
    if device.type != "cpu" or dtype == "fp32":
        return False
    return dtype == "fp16" or not native_bf16()


def compute_context(dtype: str, device: torch.device):
    """The context a forward in `dtype` on `device` runs under: GPU numerics for 16-bit dtypes on CPU."""
    if device.type != "cpu" or dtype == "fp32":
        return contextlib.nullcontext()
    return GPUNumerics(DTYPES[dtype], emulate_matmuls=emulated_matmuls(dtype, device))


def trainer_kernels(dtype: str, device: torch.device) -> str:
    """How the trainer computes in `dtype` here, in words (summary.json `trainer_kernels`)."""
    if device.type != "cpu":
        return f"{device.type}: native {dtype}"
    if dtype == "fp32":
        return "cpu: native fp32"
    gemms = (
        f"fp32 GEMMs over {dtype} values, rounded to {dtype}"
        if emulated_matmuls(dtype, device)
        else f"native {dtype} GEMMs"
    )
    return f"cpu: {gemms}; attention rounded as FlashAttention"


def machine() -> dict:
    """summary.json `machine`: the CPU class and flags, and how the trainer computes each dtype here."""
    device = default_device()
    return {
        "cpu_class": cpu_class(),
        "cpu_flags": cpu_flags(),
        "trainer_kernels": {d: trainer_kernels(d, device) for d in DTYPES},
    }


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
