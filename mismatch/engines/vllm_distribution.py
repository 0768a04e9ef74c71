"""The whole distribution vLLM samples from, at (request, response position) pairs chosen before it
generates: recorded inside its sampler, in the engine's process, as `vllm_routing` records routing.

Read in vLLM's source, 0.32 (installed here, run) and 0.33 (its wheel, read):
- With `logprobs_mode="processed_logprobs"` the V1 runner's `Sampler.sample` (v1/sample/sampler.py)
  returns `(sampled, processed_logprobs)`: the float32 log-softmax of every row after temperature and
  top-k / top-p (−inf outside the nucleus; sample/ops/topk_topp_sampler.py), one row per request in
  `runner.input_batch` order when nothing is speculated. `Sampler.forward` calls it as `self.sample`,
  so an instance attribute wraps it; the sampler runs outside captured CUDA graphs. The rows are there
  at every step already: the view copies out the chosen ones, nothing more is computed.
- A request in `runner.discard_request_mask` is in a chunked prefill: its row's token is thrown away
  (`_bookkeeping_sync`), so the row is skipped. Every other row is the request's next output token:
  the n-th kept row of a request is its response position n (a request preempted and recomputed
  resumes where it was; a row past a stop is dropped later, `Rows.within`).
- `LLM.generate` names its requests `str(next(llm.request_counter))` (entrypoints/common/offline.py),
  and the engine appends "-" and 8 random characters: the counter before the call gives request 0's.
- Not `SamplingParams(logprobs=-1)`: it needs `max_logprobs=-1`, returns rows at every step of every
  request and detokenises the vocabulary for each (about 0.17 s per request-step for 49k tokens).
- Model Runner V2 (v1/worker/gpu/, the default where Triton runs: CUDA) samples in its own
  `Sampler` with other buffers; it is not recorded here and the view says so in one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from mismatch.engines.base import RowPlan, Rows

UNAVAILABLE = "the engine's full distribution is not recorded"


class Recording:
    """The rows of one `generate` call, filled as vLLM samples (`vllm_distribution` yields it)."""

    def __init__(self, plan: RowPlan, first_request: int, vocab: int):
        pairs = sorted((request, position) for request, positions in plan.items() for position in positions)
        self.request = np.array([r for r, _ in pairs], dtype=np.int64)
        self.position = np.array([p for _, p in pairs], dtype=np.int64)
        self.logp = np.empty((len(pairs), vocab), dtype=np.float32)  # preallocated: the view's memory
        self.filled = np.zeros(len(pairs), dtype=bool)
        self.slots = {(str(first_request + r), p): slot for slot, (r, p) in enumerate(pairs)}
        self.sampled: dict[str, int] = {}  # vLLM request id (caller's part) → output tokens sampled so far
        self.failure: str | None = None  # said after the call: raising inside vLLM's step would kill the engine

    def take(self, runner: Any, processed: torch.Tensor | None) -> None:
        """One sampler step: the rows of chosen pairs into their slots."""
        rows: list[int] = []
        slots: list[int] = []
        count = runner.input_batch.num_reqs
        discarded = runner.discard_request_mask.np[:count]
        for row, request_id in enumerate(runner.input_batch.req_ids[:count]):
            if discarded[row]:
                continue
            key = request_id.rsplit("-", 1)[0]  # vLLM appends "-" and 8 random characters to the caller's id
            position = self.sampled.get(key, 0)
            self.sampled[key] = position + 1
            if (slot := self.slots.get((key, position))) is not None:
                rows.append(row)
                slots.append(slot)
        if not slots:
            return
        if processed is None or processed.shape != (count, self.logp.shape[1]):
            shape = None if processed is None else tuple(processed.shape)
            self.failure = f"vLLM's sampler gave rows of shape {shape} for {count} requests"
            return
        self.logp[slots] = processed[rows].float().cpu().numpy()
        self.filled[slots] = True

    def rows(self) -> Rows | str:
        """The rows recorded, or why they cannot be trusted (one line)."""
        if self.failure:
            return f"{UNAVAILABLE}: {self.failure}"
        if self.filled.all():  # no copy of the rows
            return Rows(self.request, self.position, self.logp)
        return Rows(self.request[self.filled], self.position[self.filled], self.logp[self.filled])


def unavailable_reason(llm) -> str | None:
    """Why `vllm_distribution` cannot record this engine's rows (one line), or None when it can."""
    from vllm.v1.engine.core_client import InprocClient
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    config = llm.llm_engine.vllm_config
    if config.model_config.logprobs_mode != "processed_logprobs":
        return f"{UNAVAILABLE}: vLLM returns {config.model_config.logprobs_mode}, not processed_logprobs"
    if not isinstance(llm.llm_engine.engine_core, InprocClient) or config.parallel_config.world_size != 1:
        return f"{UNAVAILABLE}: it needs vLLM's engine core in this process on one worker (tensor and pipeline size 1)"
    if config.speculative_config is not None:
        return f"{UNAVAILABLE} with speculative decoding (vLLM's rejection sampler)"
    (runner,) = llm.collective_rpc(lambda worker: worker.model_runner)
    if not isinstance(runner, GPUModelRunner):
        return (
            f"{UNAVAILABLE} on vLLM's {type(runner).__module__}.{type(runner).__name__} (Model Runner V2, the default"
            " on CUDA): VLLM_USE_V2_MODEL_RUNNER=0 selects the V1 runner, where it is"
        )
    return None


@contextmanager
def vllm_distribution(llm, plan: RowPlan) -> Iterator[Recording]:
    """Records, for the next `llm.generate` inside the block, the processed log-probability rows of the
    `plan`'s (request, response position) pairs. `unavailable_reason(llm)` must be None."""
    (runner,) = llm.collective_rpc(lambda worker: worker.model_runner)
    recording = Recording(plan, llm.request_counter.counter, llm.llm_engine.model_config.get_vocab_size())
    sampler = runner.sampler
    original = sampler.sample

    def sample(logits, sampling_metadata, *args, **kwargs):
        sampled, processed = original(logits, sampling_metadata, *args, **kwargs)
        recording.take(runner, processed)
        return sampled, processed

    sampler.sample = sample
    try:
        yield recording
    finally:
        del sampler.sample  # the class's method again
