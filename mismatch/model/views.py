"""What the trainer shows beyond a batched log-prob: scored alone, its top-k, and its layers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from mismatch.model.precision import compute_context
from mismatch.model.rescore import input_device, output_logits, pad_batch, rescore, response_logits
from mismatch.records import Rollout, Scored


def score_alone(model, dtype: str, rollouts: Sequence[Rollout], pad_id: int) -> list[np.ndarray]:
    """log π of each rollout scored in a micro-batch of its own (temperature 1)."""
    return [rescore(model, dtype, [r], 1.0, pad_id=pad_id)["logp_trainer"][0] for r in rollouts]


@torch.inference_mode()
def topk_rows(
    model, dtype: str, rollouts: Sequence[Rollout], *, engine: Sequence[Scored], k: int, seq_ids: Sequence[int]
) -> pd.DataFrame:
    """One row per (response position, rank) of the engine's top-k: its log-prob there, the
    trainer's log-prob of the same token, and whether the token is also in the trainer's top-k."""
    device = input_device(model)
    rows = []
    for rollout, scored, seq in zip(rollouts, engine, seq_ids, strict=True):
        batch = pad_batch([rollout.prompt_ids], [rollout.response_ids], 0, device)
        with compute_context(dtype, device):
            for start, logits in response_logits(model, batch):
                logp = torch.log_softmax(logits.float(), dim=-1)
                own_top = logp.topk(k, dim=-1).indices
                for offset, position in enumerate(range(start, start + len(logp))):
                    mine = set(own_top[offset].tolist())
                    for rank, (token, logp_engine) in enumerate(scored.topk[position]):
                        rows.append(
                            (seq, position, rank, token, logp_engine, float(logp[offset, token]), token in mine)
                        )
    return pd.DataFrame(
        rows, columns=["seq_id", "position", "rank", "token_id", "logp_engine", "logp_trainer", "in_trainer_topk"]
    )


@torch.inference_mode()
def layer_states(model, dtype: str, rollouts: Sequence[Rollout]) -> list[list[torch.Tensor]]:
    """Per sequence: the hidden state after the embedding and after each layer, then the logits
    at the response positions, as FP32 on the CPU."""
    device = input_device(model)
    states = []
    for rollout in rollouts:
        batch = pad_batch([rollout.prompt_ids], [rollout.response_ids], 0, device)
        with compute_context(dtype, device):
            out = model.base_model(input_ids=batch.input_ids, use_cache=False, output_hidden_states=True)
            logits = output_logits(model, out.last_hidden_state[0][batch.rows])
        states.append([h[0].float().cpu() for h in out.hidden_states] + [logits.float().cpu()])
    return states


def layer_errors(states: list[list[torch.Tensor]], reference: list[list[torch.Tensor]]) -> list[float]:
    """Relative error ‖x − x_ref‖ / ‖x_ref‖ per layer (and last, the logits), over all sequences."""
    errors = []
    for layer in range(len(reference[0])):
        diff = sum(float((s[layer] - r[layer]).pow(2).sum()) for s, r in zip(states, reference, strict=True))
        norm = sum(float(r[layer].pow(2).sum()) for r in reference)
        errors.append(float(np.sqrt(diff / norm)) if norm else float("nan"))
    return errors
