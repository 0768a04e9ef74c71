"""The engine protocol: prompts in, sampled tokens and their log-probabilities (μ) out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from mismatch.records import Advance, Rollout, Sampling, Scored

DISTRIBUTION_ROWS = 256  # default rows per engine dtype: 256 × 49k vocabulary × 4 B ≈ 50 MB
MAX_DISTRIBUTION_BYTES = 100 * 2**20  # the float32 rows of one engine dtype stay within this

RowPlan = dict[int, list[int]]
"""The response positions whose whole distribution is recorded, per request (its index in `generate`'s
prompt-major order); drawn before generation, so a position past a response's end simply never occurs."""


def plan_rows(requests: int, max_tokens: int, rows: int, *, seed: int) -> RowPlan:
    """`rows` (request, response position) pairs drawn by `seed`, spread evenly over the requests (each
    gets ⌊rows / requests⌋ or one more, at most `max_tokens`), positions uniform in [0, max_tokens)."""
    rng = np.random.default_rng([seed, 23])
    counts = np.full(requests, rows // requests)
    counts[rng.permutation(requests)[: rows % requests]] += 1
    plan: RowPlan = {}
    for request, count in enumerate(np.minimum(counts, max_tokens)):
        if count:
            plan[request] = sorted(int(p) for p in rng.choice(max_tokens, size=count, replace=False))
    return plan


def row_budget(rows: int, vocab: int) -> int:
    """`rows`, fewer if its float32 rows over `vocab` tokens would pass MAX_DISTRIBUTION_BYTES."""
    return max(1, min(rows, MAX_DISTRIBUTION_BYTES // (4 * vocab)))


@dataclass(frozen=True)
class Rows:
    """The engine's log-probabilities over the whole vocabulary at recorded (request, position) pairs,
    as it sampled them (after temperature and top-p: −inf outside the nucleus), sorted by request then
    position; `logp[i, response_ids[position[i]]]` is that token's log μ."""

    request: np.ndarray  # int64 [n], the request's index in `generate`'s order
    position: np.ndarray  # int64 [n], the response position
    logp: np.ndarray  # float32 [n, vocabulary]

    def within(self, rollouts: list[Rollout]) -> Rows | str:
        """The rows at positions the responses reached (an engine may sample past a stop it then drops), or
        why there are none."""
        lengths = np.array([len(r.response_ids) for r in rollouts])
        return self._kept(self.position < lengths[self.request], "no response reached a position drawn for it")

    def before(self, count: int) -> Rows | str:
        """The rows of the first `count` requests (a reference that scores only those), or why there are none."""
        return self._kept(self.request < count, f"no position drawn for it lies in the first {count} sequences")

    def _kept(self, keep: np.ndarray, none_left: str) -> Rows | str:
        if not keep.any():
            return f"no full distribution: {none_left}"
        if keep.all():
            return self  # no copy of the rows
        return Rows(self.request[keep], self.position[keep], self.logp[keep])

    def tokens(self, rollouts: list[Rollout]) -> np.ndarray:
        """The sampled token at each row's position."""
        return np.array([rollouts[r].response_ids[p] for r, p in zip(self.request, self.position, strict=True)])

    def prompts(self, rollouts: list[Rollout]) -> np.ndarray:
        """The prompt of each row (the clusters of the intervals)."""
        return np.array([rollouts[r].prompt_index for r in self.request])


class Engine(Protocol):
    name: str
    dtype: str
    execution: str  # "eager" (PyTorch op by op) or "compiled" (vLLM's torch.compile and CUDA graphs)

    def generate(
        self, prompts: list[list[int]], samples: int, sampling: Sampling, progress: Advance | None = None
    ) -> list[Rollout]:
        """`samples` responses per prompt, ordered prompt-major; deterministic for a given seed."""
        ...

    def generate_rows(
        self, prompts: list[list[int]], samples: int, sampling: Sampling, plan: RowPlan, progress: Advance | None = None
    ) -> tuple[list[Rollout], Rows | str]:
        """`generate`, recording the whole distribution sampled from at the `plan`'s positions; instead of
        the rows, one line saying why where this engine cannot record them."""
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
