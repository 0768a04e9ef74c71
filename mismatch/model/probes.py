"""Forward-hook probes on the trainer: the FP16 headroom of its activations."""

from __future__ import annotations

import math
import re

import torch

FP16_MAX = 65504.0


class ActivationPeak:
    """Largest |activation| seen while attached, with the module that produced it (forward hooks).

    Watches every module's tensor output and every Linear's input (the MLP's widest activations);
    a NaN counts as an overflow (inf). Used on the FP16 forward to measure headroom below 65504.
    """

    def __init__(self, model: torch.nn.Module):
        self.value = 0.0
        self.module: str | None = None
        self.peaks: dict[str, float] = {}  # per module
        self._handles = [
            module.register_forward_hook(self._hook(name, isinstance(module, torch.nn.Linear)))
            for name, module in model.named_modules()
            if name
        ]

    def _hook(self, name: str, check_input: bool):
        def hook(module, inputs, output):
            tensors = [output[0] if isinstance(output, tuple) else output]
            if check_input and inputs:
                tensors.append(inputs[0])
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel():
                    peak = float(tensor.detach().abs().amax())
                    peak = math.inf if math.isnan(peak) else peak
                    self.peaks[name] = max(self.peaks.get(name, 0.0), peak)
                    if peak > self.value:
                        self.value = peak
                        self.module = name

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
        return {
            "max_abs_activation": peak,
            "module": self.module,
            "limit": FP16_MAX,
            "fraction_of_limit": None if peak is None else peak / FP16_MAX,
            "overflow": overflow,
        }

    def per_layer(self) -> dict[int, float]:
        """Largest |activation| inside each numbered decoder layer (`….layers.N.…`)."""
        layers: dict[int, float] = {}
        for name, peak in self.peaks.items():
            if match := re.search(r"\.(?:layers|h|blocks)\.(\d+)(?:\.|$)", name):
                layers[int(match[1])] = max(layers.get(int(match[1]), 0.0), peak)
        return dict(sorted(layers.items()))
