"""Dynamic loss scaling for FP16 training (what torch.amp.GradScaler and DeepSpeed do)."""

from __future__ import annotations

import torch


class DynamicLossScaler:
    """FP16 loss scaling: multiply the loss by S before backward; on non-finite gradients skip the
    step and halve S; after `interval` good steps in a row double S. Disabled (S = 1, never
    grows) for BF16 / FP32, where it still reports and skips non-finite gradients."""

    def __init__(
        self,
        enabled: bool,
        *,
        init_scale: float = 2.0**16,
        backoff: float = 0.5,
        growth: float = 2.0,
        interval: int = 200,
    ):
        self.enabled = enabled
        self.backoff = backoff
        self.growth = growth
        self.interval = interval
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
