"""Dtype names and the faithful FP16 path for CPUs without native FP16 arithmetic.

A GPU's FP16 GEMM multiplies FP16 inputs exactly, accumulates in FP32 and rounds the result to
FP16. An FP32 matmul over FP16-valued inputs, rounded back to FP16, computes the same thing up to
the order of accumulation (FP16 products are exact in FP32). CPUs without AVX512-FP16 run native
FP16 matmuls on a slow path (~150x slower than BF16), so on CPU the matmul-like ops of an FP16
model are routed through FP32 by `EmulatedFP16Matmuls`; every other op stays in FP16.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VLLM_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_dtypes(text: str) -> list[str]:
    """`"bf16,fp16"` -> `["bf16", "fp16"]`; raises ValueError naming the accepted names."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    bad = [name for name in names if name not in DTYPES]
    if bad or not names:
        raise ValueError(f"unknown dtype {', '.join(bad) or repr(text)}; use a comma-separated list of {', '.join(DTYPES)}")
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


class DynamicLossScaler:
    """FP16 loss scaling: multiply the loss by S before backward; on non-finite gradients skip the
    step and halve S; after `interval` good steps in a row double S. Disabled (S = 1, never
    grows) for BF16 / FP32, where it still reports and skips non-finite gradients."""

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, backoff: float = 0.5, growth: float = 2.0, interval: int = 200):
        self.enabled, self.backoff, self.growth, self.interval = enabled, backoff, growth, interval
        self.scale = init_scale if enabled else 1.0
        self.good_steps = 0
        self.skipped = 0

    def unscale_(self, grads: list[torch.Tensor]) -> bool:
        """Divide gradients by S in place (in FP32); True if they are all finite."""
        finite = True
        for grad in grads:
            grad.div_(self.scale)
            finite &= bool(torch.isfinite(grad).all())
        return finite

    def update(self, finite: bool) -> None:
        if not finite:
            self.skipped += 1
            self.good_steps = 0
            if self.enabled:
                self.scale *= self.backoff
            return
        self.good_steps += 1
        if self.enabled and self.good_steps % self.interval == 0:
            self.scale *= self.growth


FP16_MAX = 65504.0


class ActivationPeak:
    """Largest |activation| seen while attached, with the module that produced it (forward hooks).

    Watches every module's tensor output and every Linear's input (the MLP's widest activations);
    a NaN counts as an overflow (inf). Used on the FP16 forward to measure headroom below 65504.
    """

    def __init__(self, model: torch.nn.Module):
        self.value, self.module = 0.0, None
        self._handles = [module.register_forward_hook(self._hook(name, isinstance(module, torch.nn.Linear))) for name, module in model.named_modules() if name]

    def _hook(self, name: str, check_input: bool):
        def hook(module, inputs, output):
            tensors = [output[0] if isinstance(output, tuple) else output]
            if check_input and inputs:
                tensors.append(inputs[0])
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel():
                    peak = float(tensor.detach().abs().amax())
                    peak = math.inf if math.isnan(peak) else peak
                    if peak > self.value:
                        self.value, self.module = peak, name

        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()

    def summary(self) -> dict:
        """JSON-ready: on overflow the peak is not a number, so `overflow` says it and the peak is null."""
        overflow = self.value >= FP16_MAX
        peak = None if math.isinf(self.value) else self.value
        return {"max_abs_activation": peak, "module": self.module, "limit": FP16_MAX, "fraction_of_limit": None if peak is None else peak / FP16_MAX, "overflow": overflow}
