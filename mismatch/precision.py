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
    torch.mm,
    torch.Tensor.mm,
    torch.addmm,  # GPT-2's Conv1D
    torch.Tensor.addmm,
    torch.bmm,
    torch.Tensor.bmm,
    torch.baddbmm,
    torch.einsum,
    *(op for op in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if op is not None),  # MoE experts
}


def fp16_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """FP16 scaled-dot-product attention as FlashAttention computes it on a GPU: scores and their
    softmax statistics in FP32, the unnormalised probabilities exp(s − max) rounded to FP16 before
    they multiply V (FP32 accumulation), the row sum taken unrounded, the output rounded to FP16."""
    q, k, v = query.float(), key.float(), value.float()
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k, v = (t.repeat_interleave(q.shape[-3] // t.shape[-3], dim=-3) for t in (k, v))
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        rows, cols = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(rows, cols, dtype=torch.bool, device=scores.device).tril(cols - rows), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask.float()
    top = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)  # a fully masked row stays finite
    unnormalised = torch.exp(scores - top)
    total = unnormalised.sum(dim=-1, keepdim=True)
    out = (unnormalised.half().float() @ v) / total.clamp(min=torch.finfo(torch.float32).tiny)
    return out.half()


class EmulatedFP16Matmuls(TorchFunctionMode):
    """Run FP16 matmuls as FP32 over FP16 inputs, returning FP16, and attention as `fp16_attention`
    (GPU semantics)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and _any_fp16(args, kwargs):
            return fp16_attention(*args, **kwargs)  # the mode is off inside its own handler: no recursion
        if func in _MATMUL_OPS and _any_fp16(args, kwargs):
            out = func(*_to_fp32(args), **{k: _to_fp32(v) for k, v in kwargs.items()})
            return out.to(torch.float16)
        return func(*args, **kwargs)


def _any_fp16(args, kwargs) -> bool:
    values = [*args, *kwargs.values()]
    values += [v for a in values if isinstance(a, (list, tuple)) for v in a]  # einsum("…", [a, b])
    return any(isinstance(a, torch.Tensor) and a.dtype == torch.float16 for a in values)


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
