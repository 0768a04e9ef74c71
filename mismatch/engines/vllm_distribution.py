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
- Model Runner V2 (v1/worker/gpu/, the default where Triton runs: CUDA) has its own `Sampler`
  (v1/worker/gpu/sample/sampler.py, the same in 0.32 and 0.33): `__call__` calls `self.sample(logits,
  expanded_idx_mapping, idx_mapping, idx_mapping_np, pos, input_ids, expanded_local_pos,
  seq_lens_upper_bound_np, ...)`, which returns `(sampled, processed_logits)`: the logits after
  temperature and top-k / top-p (−inf outside the nucleus), the very rows `gumbel_sample` draws from and
  whose log-softmax is vLLM's `processed_logprobs`. Rows follow `idx_mapping_np` (batch row → request
  slot of `req_states`). A row whose sequence (`seq_lens_upper_bound_np`, exact without speculation) is
  shorter than its request's `prefill_len` is a chunk of prefill and yields no token; any other row's token
  sits at response position sequence length − `prompt_len` (after a preemption the outputs so far are
  prefilled again, so `prefill_len` ≥ `prompt_len`, states.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from mismatch.engines.base import RowPlan, Rows
from mismatch.records import Rollout

UNAVAILABLE = "the engine's full distribution is not recorded"
ROW_CHECK = 1e-4  # nats: the V1 runner's rows hold μ exactly; V2's are normalised here in float32 as vLLM does
V2_ARGUMENTS = {"idx_mapping_np", "seq_lens_upper_bound_np"}  # what Model Runner V2's `Sampler.sample` is read for


def _caller_id(request_id: str) -> str:
    """The caller's request id: vLLM appends "-" and 8 random characters to it."""
    return request_id.rsplit("-", 1)[0]


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
        """One V1 sampler step: the n-th kept row of a request is its response position n."""
        rows: list[int] = []
        slots: list[int] = []
        count = runner.input_batch.num_reqs
        discarded = runner.discard_request_mask.np[:count]
        for row, request_id in enumerate(runner.input_batch.req_ids[:count]):
            if discarded[row]:
                continue
            key = _caller_id(request_id)
            position = self.sampled.get(key, 0)
            self.sampled[key] = position + 1
            if (slot := self.slots.get((key, position))) is not None:
                rows.append(row)
                slots.append(slot)
        self._copy(rows, slots, processed, count)

    def take_v2(self, states: Any, processed: torch.Tensor, slots_of_rows: np.ndarray, seq_lens: np.ndarray) -> None:
        """One Model Runner V2 sampler step: `processed` holds logits, their log-softmax the rows."""
        rows: list[int] = []
        slots: list[int] = []
        for row, index in enumerate(slots_of_rows.tolist()):
            length = int(seq_lens[row])
            if length < states.prefill_len.np[index]:
                continue
            position = length - int(states.prompt_len.np[index])
            if (slot := self.slots.get((_caller_id(states.index_to_req_id[index]), position))) is not None:
                rows.append(row)
                slots.append(slot)
        self._copy(rows, slots, processed, len(slots_of_rows), logits=True)

    def _copy(
        self,
        rows: list[int],
        slots: list[int],
        processed: torch.Tensor | None,
        count: int,
        *,
        logits: bool = False,
    ) -> None:
        """The chosen rows into their slots (`logits`: V2's rows, normalised here in float32 as vLLM does)."""
        if not slots:
            return
        if processed is None or processed.shape != (count, self.logp.shape[1]):
            shape = None if processed is None else tuple(processed.shape)
            self.failure = f"vLLM's sampler gave rows of shape {shape} for {count} requests"
            return
        chosen = processed[rows].float()
        if logits:
            chosen = torch.log_softmax(chosen, dim=-1)
        self.logp[slots] = chosen.cpu().numpy()
        self.filled[slots] = True

    def rows(self) -> Rows | str:
        """The rows recorded, or why they cannot be trusted (one line)."""
        if self.failure:
            return f"{UNAVAILABLE}: {self.failure}"
        if self.filled.all():  # no copy of the rows
            return Rows(self.request, self.position, self.logp)
        return Rows(self.request[self.filled], self.position[self.filled], self.logp[self.filled])


def checked(rows: Rows | str, rollouts: list[Rollout]) -> Rows | str:
    """The rows at positions the responses reached, if each holds at its sampled token the engine's own
    log μ (`ROW_CHECK`): a row recorded at the wrong position or request would not; else why not."""
    if isinstance(rows, str) or isinstance(rows := rows.within(rollouts), str):
        return rows
    recorded = rows.logp[np.arange(len(rows.request)), rows.tokens(rollouts)]
    own = np.array([rollouts[r].logp_engine[p] for r, p in zip(rows.request, rows.position, strict=True)])
    gap = float(np.max(np.abs(recorded - own)))
    if not gap <= ROW_CHECK:
        return f"{UNAVAILABLE}: its rows differ from the engine's own sampled-token log-probs by up to {gap:.2g}"
    return rows


def unavailable_reason(llm) -> str | None:
    """Why `vllm_distribution` cannot record this engine's rows (one line), or None when it can."""
    from vllm.v1.engine.core_client import InprocClient
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as RunnerV2
    from vllm.v1.worker.gpu.sample.sampler import Sampler as SamplerV2
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    config = llm.llm_engine.vllm_config
    if config.model_config.logprobs_mode != "processed_logprobs":
        return f"{UNAVAILABLE}: vLLM returns {config.model_config.logprobs_mode}, not processed_logprobs"
    if not isinstance(llm.llm_engine.engine_core, InprocClient) or config.parallel_config.world_size != 1:
        return f"{UNAVAILABLE}: it needs vLLM's engine core in this process on one worker (tensor and pipeline size 1)"
    if config.speculative_config is not None:
        return f"{UNAVAILABLE} with speculative decoding (vLLM's rejection sampler)"
    (runner,) = llm.collective_rpc(lambda worker: worker.model_runner)
    if not isinstance(runner, (GPUModelRunner, RunnerV2)) or type(runner.sampler) not in (Sampler, SamplerV2):
        return (
            f"{UNAVAILABLE} with vLLM's {type(runner).__name__} and its {type(runner.sampler).__name__}: it is"
            " recorded in the V1 runner's and Model Runner V2's own samplers"
        )
    if type(runner.sampler) is SamplerV2 and (
        missing := V2_ARGUMENTS - set(inspect.signature(runner.sampler.sample).parameters)
    ):
        return f"{UNAVAILABLE}: this vLLM's Model Runner V2 sampler takes no {', '.join(sorted(missing))}"
    return None


@contextmanager
def vllm_distribution(llm, plan: RowPlan) -> Iterator[Recording]:
    """Records, for the next `llm.generate` inside the block, the processed log-probability rows of the
    `plan`'s (request, response position) pairs. `unavailable_reason(llm)` must be None."""
    from vllm.v1.worker.gpu.sample.sampler import Sampler as SamplerV2

    (runner,) = llm.collective_rpc(lambda worker: worker.model_runner)
    recording = Recording(plan, llm.request_counter.counter, llm.llm_engine.model_config.get_vocab_size())
    sampler = runner.sampler
    original = sampler.sample
    arguments = inspect.signature(original).bind_partial
    v2 = isinstance(sampler, SamplerV2)

    def sample(*args, **kwargs):
        sampled, processed = original(*args, **kwargs)
        if recording.failure:
            return sampled, processed
        try:
            if v2:
                bound = arguments(*args, **kwargs).arguments
                states = runner.req_states
                recording.take_v2(states, processed, bound["idx_mapping_np"], bound["seq_lens_upper_bound_np"])
            else:
                recording.take(runner, processed)
        except Exception as error:  # raised inside vLLM's step, it would end the engine: said after the call
            recording.failure = f"recording in the sampler failed ({type(error).__name__}: {error})"
        return sampled, processed

    sampler.sample = sample
    try:
        yield recording
    finally:
        del sampler.sample  # the class's method again
