"""The engine protocol: prompts in, sampled tokens and their log-probabilities (μ) out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

Advance = Callable[[int], None]
"""Called with the number of sequences just finished."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128
    seed: int = 0


@dataclass
class Rollout:
    """One sampled response: `logp_engine[i]` is log μ(response_ids[i]) under the sampled distribution."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    logp_engine: list[float]
    finish_reason: str  # "stop" (end-of-sequence token) or "length"
    routed_experts: np.ndarray | None = None  # an MoE engine's experts at each response token's scoring position, [tokens, decoder layers, k]


@dataclass
class Scored:
    """The engine scoring a given sequence in prefill (its prompt log-probs), at temperature 1:
    `logp[i]` is log p(response_ids[i]) and `topk[i]` the engine's k most likely (token id,
    log-prob) at that position."""

    logp: list[float]
    topk: list[list[tuple[int, float]]]


class Engine(Protocol):
    name: str
    dtype: str

    def generate(self, prompts: list[list[int]], samples: int, sampling: Sampling, progress: Advance | None = None) -> list[Rollout]:
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


def requests(n_prompts: int, samples: int) -> list[tuple[int, int]]:
    """(prompt index, sample index) of every request, prompt-major: the order engines return."""
    return [(p, s) for p in range(n_prompts) for s in range(samples)]


def seq_id(prompt_index: int, sample_index: int, samples: int) -> int:
    """A sequence's position in that order: the `seq_id` of the run files."""
    return prompt_index * samples + sample_index


def request_seed(sampling: Sampling, prompt_index: int, sample_index: int, samples: int) -> int:
    """Per-request seed, so a sample does not depend on how requests are batched."""
    return sampling.seed * 1_000_003 + seq_id(prompt_index, sample_index, samples)
