"""Trainer-side log-probabilities: an HF forward in a dtype over the exact token ids the engine produced.

Sequences are right-padded, so every real token attends only to real tokens before it (the
causal mask hides the padding behind it) and positions start at 0 as without padding. Logits are
formed only for response positions, a chunk of rows at a time, so no (tokens x vocab) FP32 tensor
exists for a whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mismatch.errors import ModelError
from mismatch.model.loading import load_causal_lm
from mismatch.model.lora import with_adapter
from mismatch.model.precision import DTYPES, compute_context, default_device
from mismatch.records import Rollout

# tokens.parquet ← TokenScores
SCORE_COLUMNS = {"logp_trainer": "logp", "logp_trainer_full": "logp_full", "log_kept_mass": "log_kept_mass"}
LOGIT_ROWS = 256  # response positions turned into logits at once
BATCH_TOKENS = 8192  # padded tokens per forward


@dataclass(kw_only=True)
class PaddedBatch:
    input_ids: torch.Tensor  # [B, L], right-padded
    attention_mask: torch.Tensor  # [B, L]
    rows: torch.Tensor  # [N] flat indices into B*L of the positions that predict each response token
    targets: torch.Tensor  # [N] the response tokens, sequence-major
    lengths: list[int]  # response length of each sequence


def pad_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> PaddedBatch:
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows: list[int] = []
    targets: list[int] = []
    for b, (seq, prompt) in enumerate(zip(seqs, prompts, strict=True)):
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attention_mask[b, : len(seq)] = 1
        rows += range(b * width + len(prompt) - 1, b * width + len(seq) - 1)
        targets += seq[len(prompt) :]
    return PaddedBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        targets=torch.tensor(targets, dtype=torch.long, device=device),
        lengths=[len(r) for r in responses],
    )


@dataclass
class TokenScores:
    """Trainer-side numbers per response token (flat, FP32), under the engine's temperature.

    `logp` is log π under the trainer's nucleus (what μ, sampled under the engine's nucleus, is
    compared with): −inf for a token outside it. `logp_full` is log π under the whole tempered
    distribution and `log_kept_mass` is log S, S the probability the nucleus keeps, so that
    logp = logp_full − log S inside the nucleus. Without top-p, S = 1.
    """

    logp: torch.Tensor
    logp_full: torch.Tensor
    log_kept_mass: torch.Tensor
    entropy: torch.Tensor | None = None  # of each position's (nucleus) distribution, when asked


class _DecoderOutput:
    """What a causal LM's forward reads from its decoder: the given hidden states, and None for
    any other field it passes along (past_key_values, router_logits, cross_attentions …)."""

    def __init__(self, hidden: torch.Tensor):
        self.last_hidden_state = hidden

    def __getattr__(self, name):
        return None

    def __getitem__(self, index):
        return (self.last_hidden_state,)[index]


class _GivenHidden(torch.nn.Module):
    """Stands in for a model's decoder and returns hidden states already computed, so that the
    model's own forward runs just its output path on them."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        return _DecoderOutput(self.hidden)


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits for `hidden` ([rows, hidden size]) exactly as the model's forward computes them:
    its lm_head and whatever its architecture does after it (Granite's logits_scaling, Cohere's
    logit_scale, Gemma's final softcap …), in the model's dtype, by the model's own code."""
    name = model.base_model_prefix
    decoder = getattr(model, name)
    setattr(model, name, _GivenHidden(hidden[None]))
    try:
        ids = torch.zeros((1, hidden.shape[0]), dtype=torch.long, device=hidden.device)
        return model(input_ids=ids, use_cache=False, logits_to_keep=0).logits[0]
    finally:
        setattr(model, name, decoder)


def last_hidden(model, batch: PaddedBatch) -> torch.Tensor:
    """The decoder's output at every position of `batch`, flat ([B·L, hidden size])."""
    hidden = model.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1]).to(batch.rows.device)  # sharded: the last layer's device


def response_logits(model, batch: PaddedBatch):
    """(offset, logits) for the response positions of `batch`, LOGIT_ROWS rows at a time in the
    model's dtype: the decoder runs once, then the model's own output path on each chunk."""
    hidden = last_hidden(model, batch)
    for start in range(0, len(batch.rows), LOGIT_ROWS):
        yield start, output_logits(model, hidden[batch.rows[start : start + LOGIT_ROWS]])


def response_logprobs(
    model, batch: PaddedBatch, temperature: float, *, top_p: float = 1.0, with_entropy: bool = False
) -> TokenScores:
    """log π of each response token under temperature (and top-p) as the engine sampled.

    The decoder and the output path run in the model's dtype (logits rounded to it, as in
    training); temperature, top-p and log-softmax run in FP32, LOGIT_ROWS rows at a time, so no
    (tokens × vocab) FP32 tensor exists for the batch.
    """
    parts: dict[str, list[torch.Tensor]] = {"logp": [], "logp_full": [], "log_kept_mass": [], "entropy": []}
    for start, logits in response_logits(model, batch):
        targets = batch.targets[start : start + LOGIT_ROWS, None]
        logits = logits.float()
        if temperature != 1.0:
            logits = logits / temperature
        target = logits.gather(-1, targets).squeeze(-1)
        total = torch.logsumexp(logits, dim=-1)
        if top_p < 1.0:
            logits = top_p_filter(logits, top_p)
            kept = torch.logsumexp(logits, dim=-1)
            inside = torch.isfinite(logits.gather(-1, targets).squeeze(-1))
            logp = torch.where(inside, target - kept, torch.full_like(target, float("-inf")))
        else:
            kept = total
            logp = target - total
        parts["logp"].append(logp)
        parts["logp_full"].append(target - total)
        parts["log_kept_mass"].append(kept - total)
        if with_entropy:
            with torch.no_grad():  # logged, never differentiated
                parts["entropy"].append(entropy(logits))
    empty = torch.empty(0, dtype=torch.float32, device=batch.input_ids.device)
    joined = {name: torch.cat(values) if values else empty for name, values in parts.items()}
    return TokenScores(
        joined["logp"], joined["logp_full"], joined["log_kept_mass"], joined["entropy"] if with_entropy else None
    )


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """−Σ p log p per row of FP32 logits (a −inf logit, outside a nucleus, counts 0): the fused softmax,
    then −p log p per element (`torch.special.entr`) and the row sum — as exact as log-softmax, exp,
    product and sum, in two thirds of their time over a 49k vocabulary on a CPU."""
    return torch.special.entr(torch.softmax(logits, dim=-1)).sum(-1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (vLLM's rule); the rest -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - top_p
    drop_sorted[..., -1] = False
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def load_trainer(
    model: Path,
    dtype: str,
    *,
    device: torch.device | None = None,
    trust_remote_code: bool = False,
    device_map=None,
    lora: Path | None = None,
):
    """The HF model in `dtype`, with attention that honours its semantics, its output path checked;
    with the LoRA adapter folder `lora` applied as PEFT applies it in training (`mismatch.model.lora`).

    With several GPUs visible (or a `device_map` given) accelerate places it: its layers sharded
    across the devices ("auto"), or as the map says (a dict may offload modules to "cpu" or "disk").
    """
    if device_map is None and device is None and torch.cuda.device_count() > 1:
        device_map = "auto"
    placement = {} if device_map is None else {"device_map": device_map}
    hf = load_causal_lm(model, DTYPES[dtype], trust_remote_code=trust_remote_code, **placement)
    if lora:
        hf = with_adapter(hf, lora)
    hf = (hf.to(device or default_device()) if device_map is None else hf).eval()
    check_output_path(hf, dtype)
    return hf


def input_device(model) -> torch.device:
    """Where a batch goes in: the input embedding's device (the first shard under a device_map;
    CPU for a module offloaded to disk, whose weights accelerate brings in per forward)."""
    weight = model.get_input_embeddings().weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


@torch.inference_mode()
def check_output_path(model, dtype: str) -> None:
    """`output_logits` must reproduce the model's own logits; refuse an architecture where it does not."""
    device = input_device(model)
    ids = (torch.arange(8, device=device)[None] * 7 + 3) % model.config.get_text_config().vocab_size
    with compute_context(dtype, device):
        theirs = model(input_ids=ids, use_cache=False).logits[0].float()
        ours = output_logits(model, model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0]).float()
    finite = torch.isfinite(theirs)  # an FP16 model may overflow here; the scan counts that later
    scale = float(theirs[finite].abs().max()) if finite.any() else 0.0
    ours = ours.to(theirs.device)  # sharded: the head's device and the model output's may differ
    if not torch.equal(finite, torch.isfinite(ours)) or not torch.allclose(
        ours[finite], theirs[finite], rtol=1e-3, atol=1e-3 * scale
    ):
        gap = float((ours[finite] - theirs[finite]).abs().max()) if finite.any() else float("nan")
        raise ModelError(
            f"{type(model).__name__}: mismatch cannot reproduce this architecture's logits from its decoder output "
            f"(max |Δ| {gap:.3g}); it is not supported yet"
        )


@torch.inference_mode()
def rescore(
    model,
    dtype: str,
    rollouts: Sequence[Rollout],
    temperature: float,
    *,
    top_p: float = 1.0,
    pad_id: int = 0,
    progress: Callable[[int], None] | None = None,
    with_entropy: bool = False,
) -> dict[str, list[np.ndarray]]:
    """Per TokenScores field (`logp_trainer`, `logp_trainer_full`, `log_kept_mass`, and `entropy` when
    asked): one float64 array per rollout's response tokens, in the order of `rollouts`."""
    device = input_device(model)
    order = sorted(range(len(rollouts)), key=lambda i: len(rollouts[i].prompt_ids) + len(rollouts[i].response_ids))
    columns = SCORE_COLUMNS | ({"entropy": "entropy"} if with_entropy else {})
    result = {name: [np.empty(0)] * len(rollouts) for name in columns}
    for group in token_batches(order, rollouts, BATCH_TOKENS):
        chosen = [rollouts[i] for i in group]
        batch = pad_batch([r.prompt_ids for r in chosen], [r.response_ids for r in chosen], pad_id, device)
        with compute_context(dtype, device):
            scores = response_logprobs(model, batch, temperature, top_p=top_p, with_entropy=with_entropy)
        for name, field in columns.items():
            values = getattr(scores, field).double().cpu().numpy()
            for i, piece in zip(group, np.split(values, np.cumsum(batch.lengths)[:-1]), strict=True):
                result[name][i] = piece
        if progress:
            progress(len(group))
    return result


def token_batches(order: list[int], rollouts: Sequence[Rollout], budget: int) -> Iterator[list[int]]:
    """`size_batches` of rollouts, a sequence's size its prompt and response tokens.

    (`rescore` passes the sequences sorted by length, so padding stays small.)"""
    return size_batches(order, [len(r.prompt_ids) + len(r.response_ids) for r in rollouts], budget)


def size_batches(order: list[int], sizes: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Consecutive groups of `order` whose padded size (longest × count) stays within `budget` tokens."""
    group: list[int] = []
    longest = 0
    for i in order:
        if group and max(longest, sizes[i]) * (len(group) + 1) > budget:
            yield group
            group = []
            longest = 0
        group.append(i)
        longest = max(longest, sizes[i])
    if group:
        yield group


DISTRIBUTION_CHUNK = 8  # rows over the vocabulary turned into log π at once (the caller compares each chunk)


@torch.inference_mode()
def distribution_rows(
    model,
    dtype: str,
    rollouts: Sequence[Rollout],
    pairs: tuple[np.ndarray, np.ndarray],
    *,
    temperature: float,
    top_p: float = 1.0,
    pad_id: int = 0,
) -> Iterator[tuple[int, np.ndarray]]:
    """log π over the whole vocabulary at each (rollout index, response position) of `pairs` (two int
    arrays, sorted by rollout), under temperature and top-p as `response_logprobs` applies them (−inf
    outside the trainer's nucleus): (offset into the pairs, float32 [≤ DISTRIBUTION_CHUNK, vocabulary])
    in the pairs' order. The rollouts that hold pairs are run in padded batches of BATCH_TOKENS; no more
    than one chunk of rows over the vocabulary exists at a time."""
    request, position = pairs
    device = input_device(model)
    holders = list(dict.fromkeys(int(r) for r in request))
    offset = 0
    for group in token_batches(holders, rollouts, BATCH_TOKENS):
        chosen = [rollouts[i] for i in group]
        batch = pad_batch([r.prompt_ids for r in chosen], [r.response_ids for r in chosen], pad_id, device)
        starts = dict(zip(group, np.cumsum([0, *batch.lengths[:-1]]).tolist(), strict=True))
        mine = np.isin(request, group)
        flat = torch.tensor([starts[int(r)] + int(p) for r, p in zip(request[mine], position[mine], strict=True)])
        with compute_context(dtype, device):
            hidden = last_hidden(model, batch)
            for start in range(0, len(flat), DISTRIBUTION_CHUNK):
                rows = batch.rows[flat[start : start + DISTRIBUTION_CHUNK].to(batch.rows.device)]
                logits = output_logits(model, hidden[rows]).float() / temperature
                if top_p < 1.0:
                    logits = top_p_filter(logits, top_p)
                yield offset + start, torch.log_softmax(logits, dim=-1).cpu().numpy()
        offset += len(flat)
