"""Trainer-side log-probabilities: an HF forward in a dtype over the exact token ids the engine produced.

Sequences are right-padded, so every real token attends only to real tokens before it (the
causal mask hides the padding behind it) and positions start at 0 as without padding. Logits are
formed only for response positions, a chunk of rows at a time, so no (tokens x vocab) FP32 tensor
exists for a whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from mismatch.engines.base import Rollout
from mismatch.precision import DTYPES, compute_context, default_device

LOGIT_ROWS = 256  # response positions turned into logits at once
BATCH_TOKENS = 8192  # padded tokens per forward


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor  # [B, L], right-padded
    attention_mask: torch.Tensor  # [B, L]
    rows: torch.Tensor  # [N] flat indices into B*L of the positions that predict each response token
    targets: torch.Tensor  # [N] the response tokens, sequence-major
    lengths: list[int]  # response length of each sequence


def pad_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> PaddedBatch:
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, targets = [], []
    for b, (seq, prompt) in enumerate(zip(seqs, prompts)):
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attention_mask[b, : len(seq)] = 1
        rows += range(b * width + len(prompt) - 1, b * width + len(seq) - 1)
        targets += seq[len(prompt) :]
    return PaddedBatch(
        input_ids.to(device),
        attention_mask.to(device),
        torch.tensor(rows, dtype=torch.long, device=device),
        torch.tensor(targets, dtype=torch.long, device=device),
        [len(r) for r in responses],
    )


def response_logprobs(model, batch: PaddedBatch, temperature: float, top_p: float = 1.0, with_entropy: bool = False):
    """log π of each response token (flat, FP32) under temperature (and top-p) as the engine sampled.

    The lm_head runs in the model's dtype (its output rounded to that dtype, as in training);
    temperature, top-p and log-softmax run in FP32. With `with_entropy`, also the entropy of each
    position's (tempered) distribution, as a second tensor.
    """
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    logps, entropies = [], []
    for start in range(0, len(batch.rows), LOGIT_ROWS):
        rows = batch.rows[start : start + LOGIT_ROWS]
        targets = batch.targets[start : start + LOGIT_ROWS, None]
        logits = head(hidden[rows]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        if temperature != 1.0:
            logits = logits / temperature
        if top_p < 1.0:
            logits = top_p_filter(logits, top_p)
        if with_entropy:
            logp = torch.log_softmax(logits, dim=-1)
            logps.append(logp.gather(-1, targets).squeeze(-1))
            with torch.no_grad():  # logged, never differentiated
                entropies.append(-(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1))
        else:  # log_softmax at the targets only: no second (rows x vocab) tensor
            logps.append((logits.gather(-1, targets) - torch.logsumexp(logits, dim=-1, keepdim=True)).squeeze(-1))
    empty = hidden.new_empty(0, dtype=torch.float32)
    logp = torch.cat(logps) if logps else empty
    return (logp, torch.cat(entropies) if entropies else empty) if with_entropy else logp


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (vLLM's rule); the rest -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - top_p
    drop_sorted[..., -1] = False
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def load_trainer(model: Path, dtype: str, device: torch.device | None = None, trust_remote_code: bool = False):
    device = device or default_device()
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    return hf.to(device).eval()


@torch.inference_mode()
def rescore(
    model,
    dtype: str,
    rollouts: Sequence[Rollout],
    temperature: float,
    top_p: float = 1.0,
    pad_id: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """log π (float64 arrays) of every rollout's response tokens, in the order of `rollouts`."""
    device = next(model.parameters()).device
    order = sorted(range(len(rollouts)), key=lambda i: len(rollouts[i].prompt_ids) + len(rollouts[i].response_ids))
    result: list[np.ndarray] = [np.empty(0)] * len(rollouts)
    for group in token_batches(order, rollouts, BATCH_TOKENS):
        chosen = [rollouts[i] for i in group]
        batch = pad_batch([r.prompt_ids for r in chosen], [r.response_ids for r in chosen], pad_id, device)
        with compute_context(dtype, device):
            logp = response_logprobs(model, batch, temperature, top_p).double().cpu().numpy()
        for i, piece in zip(group, np.split(logp, np.cumsum(batch.lengths)[:-1])):
            result[i] = piece
        if progress:
            progress(len(group))
    return result


def token_batches(order: list[int], rollouts: Sequence[Rollout], budget: int):
    """Consecutive groups of `order` whose padded size (longest × count) stays within `budget` tokens.

    (`rescore` passes the sequences sorted by length, so padding stays small.)"""
    group: list[int] = []
    longest = 0
    for i in order:
        length = len(rollouts[i].prompt_ids) + len(rollouts[i].response_ids)
        if group and max(longest, length) * (len(group) + 1) > budget:
            yield group
            group, longest = [], 0
        group.append(i)
        longest = max(longest, length)
    if group:
        yield group
