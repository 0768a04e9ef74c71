"""The records that travel between the stages: sampling settings, the engine's rollouts (tokens
and μ), its prefill scores, and the one order and seed every engine and run file shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mismatch.errors import ConfigError

DTYPE_NAMES = ("bf16", "fp16", "fp32")
DUMP_SIDES = ("engine", "trainer")  # an analysed dump's own pair: its μ and its π

Advance = Callable[[int], None]
"""Called with the number of sequences just finished."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 128
    seed: int = 0


@dataclass(kw_only=True)
class Rollout:
    """One sampled response: `logp_engine[i]` is log μ(response_ids[i]) under the sampled distribution."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    logp_engine: list[float]
    finish_reason: str  # "stop" (end-of-sequence token) or "length"
    # an MoE engine's experts at each response token's scoring position, [tokens, decoder layers, k]
    routed_experts: np.ndarray | None = None


@dataclass
class Scored:
    """The engine scoring a given sequence in prefill (its prompt log-probs), at temperature 1:
    `logp[i]` is log p(response_ids[i]) and `topk[i]` the engine's k most likely (token id,
    log-prob) at that position."""

    logp: list[float]
    topk: list[list[tuple[int, float]]]


def requests(n_prompts: int, samples: int) -> list[tuple[int, int]]:
    """(prompt index, sample index) of every request, prompt-major: the order engines return."""
    return [(p, s) for p in range(n_prompts) for s in range(samples)]


def seq_id(prompt_index: int, sample_index: int, samples: int) -> int:
    """A sequence's position in that order: the `seq_id` of the run files."""
    return prompt_index * samples + sample_index


def request_seed(sampling: Sampling, prompt_index: int, sample_index: int, samples: int) -> int:
    """Per-request seed, so a sample does not depend on how requests are batched."""
    return sampling.seed * 1_000_003 + seq_id(prompt_index, sample_index, samples)


def response_rows(rows: np.ndarray, prompt_len: int) -> np.ndarray:
    """The rows at the response tokens' scoring positions: row i scores response token i, at input
    position prompt_len + i − 1. `rows` in `routed_experts`' layout ([prompt_len + n − 1, …])."""
    return rows[prompt_len - 1 :]


def parse_dtypes(text: str) -> list[str]:
    """`"bf16,fp16"` -> `["bf16", "fp16"]`; raises ConfigError naming the accepted names."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    bad = [name for name in names if name not in DTYPE_NAMES]
    if bad or not names:
        raise ConfigError(
            f"unknown dtype {', '.join(bad) or repr(text)}; use a comma-separated list of {', '.join(DTYPE_NAMES)}"
        )
    return list(dict.fromkeys(names))
