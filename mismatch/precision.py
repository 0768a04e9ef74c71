"""Dtype names and the faithful FP16 path for CPUs without native FP16 arithmetic.

A GPU's FP16 GEMM multiplies FP16 inputs exactly, accumulates in FP32 and rounds the result to
FP16. An FP32 matmul over FP16-valued inputs, rounded back to FP16, computes the same thing up to
the order of accumulation (FP16 products are exact in FP32). CPUs without AVX512-FP16 run native
FP16 matmuls on a slow path (~150x slower than BF16), so on CPU the matmul-like ops of an FP16
model are routed through FP32 by `EmulatedFP16Matmuls`; every other op stays in FP16.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mismatch.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VLLM_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_dtypes(text: str) -> list[str]:
    """`"bf16,fp16"` -> `["bf16", "fp16"]`; raises ConfigError naming the accepted names."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    bad = [name for name in names if name not in DTYPES]
    if bad or not names:
        raise ConfigError(f"unknown dtype {', '.join(bad) or repr(text)}; use a comma-separated list of {', '.join(DTYPES)}")
    return list(dict.fromkeys(names))


_MATMUL_OPS = {
    F.linear,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.bmm,
    torch.Tensor.bmm,
    torch.baddbmm,
    F.scaled_dot_product_attention,
}


class EmulatedFP16Matmuls(TorchFunctionMode):
    """Run FP16 matmuls and attention as FP32 over FP16 inputs, returning FP16 (GPU semantics)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMUL_OPS and _any_fp16(args, kwargs):
            out = func(*_to_fp32(args), **{k: _to_fp32(v) for k, v in kwargs.items()})
            return out.to(torch.float16)
        return func(*args, **kwargs)


def _any_fp16(args, kwargs) -> bool:
    return any(isinstance(a, torch.Tensor) and a.dtype == torch.float16 for a in (*args, *kwargs.values()))


def _to_fp32(value):
    if isinstance(value, torch.Tensor) and value.dtype == torch.float16:
        return value.float()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_fp32(v) for v in value)
    return value


def compute_context(dtype: str, device: torch.device):
    """The context a forward in `dtype` on `device` runs under: emulated matmuls for FP16 on CPU."""
    if dtype == "fp16" and device.type == "cpu":
        return EmulatedFP16Matmuls()
    return contextlib.nullcontext()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
