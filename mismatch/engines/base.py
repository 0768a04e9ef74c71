"""The engine protocol: prompts in, sampled tokens and their log-probabilities (μ) out."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from mismatch.records import Advance, Rollout, Sampling, Scored


class Engine(Protocol):
    name: str
    dtype: str
    execution: str  # "eager" (PyTorch op by op) or "compiled" (vLLM's torch.compile and CUDA graphs)

    def generate(
        self, prompts: list[list[int]], samples: int, sampling: Sampling, progress: Advance | None = None
    ) -> list[Rollout]:
        """`samples` responses per prompt, ordered prompt-major; deterministic for a given seed."""
        ...

    def load_weights(self, state_dict: dict) -> None:
        """Replace the live engine's weights (HF names) in place: the RL loop's sync after a step."""
        ...

    def load_adapter(self, path: Path) -> None:
        """Apply the LoRA adapter saved at `path` from now on (the engine was started with one): the RL
        loop's sync of a LoRA policy."""
        ...

    def score(self, sequences: list[tuple[list[int], list[int]]], topk: int = 0, alone: bool = False) -> list[Scored]:
        """Prefill log-probs of each (prompt ids, response ids)'s response tokens: all sequences in
        one shuffled batch, or each `alone` in a batch of its own (vLLM only)."""
        ...

    def sleep(self) -> None:
        """Give back the memory of weights and cache until `wake_up` (vLLM sleep mode; a no-op elsewhere):
        the RL loop's learner step then has the GPU."""
        ...

    def wake_up(self) -> None: ...

    def close(self) -> None: ...
