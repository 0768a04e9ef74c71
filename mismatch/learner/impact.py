"""The gradient's bias from the mismatch against its noise, measured on one batch at θ = θ′
(before the update); the statistics are `stats.impact`'s.

Each kind of vector is its own backward pass with its own coefficient per token (never a
difference of two separately rounded gradients: a BF16 gradient's rounding would swamp u − v):

- "u": c⁰ = ∂L⁰/∂log π, L⁰ the loss in use with its correction weights set to 1 (`logp_engine :=
  logp_old`), taken by autograd on `losses.LOSSES[algo]` over the whole batch (its denominator is
  a batch constant: B × mean length for token means, B for sequence means);
- "d": c⁰(1 − ρ_i) = u − v, ρ_i = exp Σ_t (log π − log μ) untruncated;
- "e:<C>": c⁰(w^C − ρ_i) = w^C − v, for each correction C replayed (and "loss:<algo>" when the
  loss in use carries one: c^use − c⁰ρ_i, c^use from autograd with the real μ);
- "u_fp32" (optional): c⁰ through an FP32 copy of the model, for the trainer's own rounding.

Groups are dealt into K folds; per fold, its sequences run in micro-batches: one forward with grad,
then one `torch.autograd.grad` per kind. The fold sums are kept as exact FP32 vectors when they
fit EXACT_BYTES, else as a seeded count-sketch of SKETCH_DIM dimensions (unbiased inner products).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mismatch.learner.losses import LOSSES, MIS_CAP, TIS_CAP, to_padded
from mismatch.model.precision import compute_context
from mismatch.model.rescore import input_device, pad_batch, response_logprobs, size_batches
from mismatch.records import Rollout
from mismatch.stats.corrections import CORRECTIONS, Correction, ratios, weights
from mismatch.stats.impact import (
    BatchFacts,
    CorrectionFacts,
    ImpactResult,
    fold_of_groups,
    impact_from_gram,
    not_measured,
)

MICRO_BATCH_TOKENS = 2048  # padded tokens per forward with grad (the learner's own micro-batch)
EXACT_BYTES = 512 * 2**20  # exact fold gradients up to this size in all; above it, the count-sketch
HASH_CACHE_BYTES = 2**30  # the sketch's signs cached while 4 bytes per parameter element fit this (in each
# gradient dtype met: 2 bytes for 16-bit gradients, 4 more with the FP32 reference)
SKETCH_DIM = 2**16
_CHUNK = 2**22  # parameter elements hashed and added at once

Hash = tuple[Tensor, list[int]]
"""A chunk's count-sketch hash: a sign per element (±1 in the gradients' dtype), a shift per block of `dim`."""
LogpFn = Callable[[list[int]], Tensor]
"""Sequence indices → flat log π (with grad) of those sequences' response tokens, in that order."""

LOSS_WEIGHTS = {
    "token-tis": Correction(
        name="loss:token-tis", ratio="token", action="truncate", low=None, high=TIS_CAP, source="learner.losses"
    ),
    "seq-mis": Correction(
        name="loss:seq-mis", ratio="sum", action="mask", low=None, high=MIS_CAP, source="learner.losses"
    ),
    "pg-seq-is": Correction(
        name="loss:pg-seq-is", ratio="sum", action="truncate", low=None, high=None, source="learner.losses"
    ),
}
"""The losses that weight by μ, each as the correction it applies: its clamp share is read from this;
its coefficients come from autograd on the loss itself."""


@dataclass(kw_only=True)
class ImpactBatch:
    """One batch of rollouts at θ = θ′, sequences group-major (group g is rows g·G … g·G + G − 1)."""

    logp_old: Tensor  # flat log π_θ′ of every response token, the sequences end to end
    logp_engine: Tensor  # flat log μ, the same layout
    advantages: Tensor  # [B], held fixed as computed from the batch
    lengths: list[int]  # response tokens per sequence
    group_size: int
    algo: str  # a name of losses.LOSSES
    sizes: list[int] | None = None  # tokens each sequence costs in a forward (prompt + response); default lengths


def loss_coefficients(
    algo: str, *, logp_old: Tensor, logp_engine: Tensor, advantages: Tensor, lengths: list[int]
) -> tuple[Tensor, Tensor]:
    """(c⁰, c^use) per token in float64: ∂L/∂log π at log π = log π_θ′ over the whole batch, with
    `logp_engine := logp_old` (every correction weight exactly 1) and with the real μ."""
    old = logp_old.detach().double()

    def padded(flat: Tensor) -> Tensor:
        return to_padded(flat, lengths)

    mask = padded(torch.ones_like(old))
    adv = advantages.detach().double().to(old.device)

    def coefficient(engine: Tensor) -> Tensor:
        logp = old.clone().requires_grad_()
        loss = LOSSES[algo](padded(logp), logp_old=padded(old), logp_engine=padded(engine), adv=adv, mask=mask)
        (grad,) = torch.autograd.grad(loss, logp)
        return grad

    return coefficient(old), coefficient(logp_engine.detach().double().to(old.device))


def measure_impact(
    logp_fn: LogpFn,
    params: Sequence[Tensor],
    batch: ImpactBatch,
    *,
    folds: int = 8,
    seed: int = 0,
    corrections: Sequence[Correction] = CORRECTIONS,
    reference: tuple[LogpFn, Sequence[Tensor]] | None = None,
    scale: float = 1.0,
    user_batch: int | None = None,
    store: str = "auto",
    sketch_dim: int = SKETCH_DIM,
    token_budget: int = MICRO_BATCH_TOKENS,
) -> ImpactResult:
    """The impact of the mismatch on the gradient of `params` (those `logp_fn` differentiates).

    `reference`: (logp_fn, params) of an FP32 model with the same parameters in the same order, for
    the "u_fp32" kind. `scale`: multiplies the coefficients in the backward (a 16-bit model's loss
    scale); the gradients are divided by it in FP32. `store`: "auto" (the EXACT_BYTES rule),
    "exact" or "sketch". K = min(folds, groups) folds.
    """
    lengths = list(batch.lengths)
    sequences = len(lengths)
    groups = sequences // batch.group_size
    if groups * batch.group_size != sequences:
        raise ValueError(f"{sequences} sequences are not whole groups of {batch.group_size}")
    if folds < 2:
        raise ValueError(f"the bias is a product across folds: give 2 or more folds, not {folds}")
    seq_index = np.repeat(np.arange(sequences), lengths)
    log_ratio = (batch.logp_old.detach().double() - batch.logp_engine.detach().double()).cpu().numpy()
    log_rho = np.bincount(seq_index, weights=log_ratio, minlength=sequences)
    c0, c_use = loss_coefficients(
        batch.algo, logp_old=batch.logp_old, logp_engine=batch.logp_engine, advantages=batch.advantages, lengths=lengths
    )
    c0_np = c0.cpu().numpy()
    chosen = [*corrections, *([LOSS_WEIGHTS[batch.algo]] if batch.algo in LOSS_WEIGHTS else [])]
    coefficients, facts = kind_coefficients(
        c0_np, c_use.cpu().numpy(), log_ratio=log_ratio, seq_index=seq_index, sequences=sequences, corrections=chosen
    )
    if reference is not None:
        coefficients["u_fp32"] = c0_np
    kinds = list(coefficients)
    k = min(folds, groups)
    mode, reason = choose_store(sum(p.numel() for p in params), len(kinds) * k, store)
    base = BatchFacts(
        group_size=batch.group_size,
        fold_sizes=[],
        log_rho=log_rho,
        advantages=batch.advantages.detach().double().cpu().numpy(),
        store=mode,
        store_reason=reason,
        corrections=facts,
    )
    if groups < 2:
        return not_measured(base, "not measurable: fewer than 2 groups")
    fold_of_group = fold_of_groups(groups, k, seed)
    base.fold_sizes = np.bincount(fold_of_group, minlength=k).tolist()
    gradients = GradientStore(params, len(kinds) * k, mode=mode, seed=seed, dim=sketch_dim)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    sizes = batch.sizes or lengths
    touched = np.logical_or.reduce([c != 0 for c in coefficients.values()])
    active = np.flatnonzero(np.bincount(seq_index, weights=touched, minlength=sequences))  # others add nothing
    with torch.enable_grad():
        for fold in range(k):
            members = sorted(active[fold_of_group[active // batch.group_size] == fold].tolist(), key=sizes.__getitem__)
            rows = {kind: a * k + fold for a, kind in enumerate(kinds)}
            for micro in size_batches(members, sizes, token_budget):
                tokens = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in micro])
                todo = {
                    rows[kind]: torch.from_numpy(c[tokens] * scale)
                    for kind, c in coefficients.items()
                    if kind != "u_fp32" and c[tokens].any()
                }
                _backward(logp_fn(micro), params, todo, gradients, scale)
                if reference is not None:
                    todo = {rows["u_fp32"]: torch.from_numpy(c0_np[tokens])}
                    _backward(reference[0](micro), reference[1], todo, gradients, 1.0)
    whole = np.asarray(groups / np.asarray(base.fold_sizes, dtype=np.float64))  # X̂_k = (n / n_k) Σ_{g∈k} x_g
    scales = np.tile(whole, len(kinds))
    gram = (gradients.gram() * scales[:, None] * scales[None, :]).reshape(len(kinds), k, len(kinds), k)
    return impact_from_gram(gram, kinds, batch=base, user_batch=user_batch)


def kind_coefficients(
    c0: np.ndarray,
    c_use: np.ndarray,
    *,
    log_ratio: np.ndarray,
    seq_index: np.ndarray,
    sequences: int,
    corrections: Sequence[Correction],
) -> tuple[dict[str, np.ndarray], list[CorrectionFacts]]:
    """Per kind, its coefficient per token ("u": c⁰, "d": c⁰(1 − ρ), "e:<C>": c⁰(w^C − ρ), or c^use − c⁰ρ
    for the loss's own "loss:<algo>"); and per correction its level and clamp share. An overflowed ρ
    makes its kinds non-finite, which stats.impact reports, never turning them into numbers."""
    with np.errstate(over="ignore", invalid="ignore"):
        rho = np.exp(np.bincount(seq_index, weights=log_ratio, minlength=sequences))[seq_index]
        coefficients = {"u": c0, "d": c0 * (1 - rho)}
        facts: list[CorrectionFacts] = []
        for correction in corrections:
            weight, changed = weights(correction, ratios(correction, log_ratio, seq_index, sequences))
            if correction.name.startswith("loss:"):
                coefficients[f"e:{correction.name}"] = c_use - c0 * rho
            else:
                coefficients[f"e:{correction.name}"] = c0 * (
                    (weight if correction.level == "token" else weight[seq_index]) - rho
                )
            facts.append(
                CorrectionFacts(name=correction.name, level=correction.level, share_clamped=float(changed.mean()))
            )
    return coefficients, facts


def _backward(
    logp: Tensor, params: Sequence[Tensor], todo: dict[int, Tensor], gradients: GradientStore, scale: float
) -> None:
    """One `autograd.grad` per store row (kind and fold) through the same forward, each with its
    coefficients; the gradients into the store in FP32, divided by `scale`."""
    for n, (row, coefficient) in enumerate(todo.items()):
        grads = torch.autograd.grad(
            logp,
            list(params),
            grad_outputs=coefficient.to(logp.device, logp.dtype),
            retain_graph=n < len(todo) - 1,
            allow_unused=True,
        )
        gradients.add(row, grads, scale=scale)


def choose_store(n_params: int, rows: int, requested: str = "auto") -> tuple[str, str]:
    """("exact" | "count-sketch", why): exact FP32 fold vectors while they fit EXACT_BYTES in all."""
    size = rows * n_params * 4
    facts = f"{rows} fold vectors × {n_params:,} parameters × 4 bytes = {size / 2**20:,.0f} MiB"
    if requested == "exact":
        return "exact", f"asked for; {facts}"
    if requested == "sketch":
        return "count-sketch", f"asked for; {SKETCH_DIM:,}-dimensional sketches instead of {facts}"
    if size <= EXACT_BYTES:
        return "exact", f"{facts} ≤ {EXACT_BYTES // 2**20} MiB"
    return "count-sketch", f"{facts} > {EXACT_BYTES // 2**20} MiB: seeded {SKETCH_DIM:,}-dimensional count-sketches"


def sketch_hash(
    seed: int, parameter: int, chunk: int, size: int, *, dim: int, device: torch.device, dtype: torch.dtype
) -> Hash:
    """The count-sketch's hash of `size` elements of chunk `chunk` (_CHUNK elements each) of the
    parameter tensor numbered `parameter`: a sign per element (±1 in `dtype`, the gradients', so that
    the product is exact and no wider than they are) and a shift per block of `dim` consecutive
    elements, iid uniform from a generator seeded by (seed, parameter, chunk): the same on every call
    and in every dtype (the FP32 reference's gradients and the 16-bit ones share one hash)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(((seed * 1_000_003 + parameter) * 1_000_003 + chunk) % 2**63)
    bits = torch.randint(0, 2, (size,), generator=generator, device=device, dtype=torch.int8)
    shifts = torch.randint(0, dim, (-(-size // dim),), generator=generator, device=device)
    return bits.to(dtype).mul_(2).sub_(1), shifts.tolist()


class GradientStore:
    """Rows of fold gradients over the parameters end to end: exact FP32, or a count-sketch S x with
    (S x)_j = Σ_{i: h(i)=j} s(i) x_i, so that E⟨S x, S y⟩ = ⟨x, y⟩ over the hash's seed (linear: the
    micro-batches' sketches add up).

    The sketch's bucket h(i) is i's place in its block of `dim` consecutive elements, rotated by the
    block's random shift: two elements of one block never share a bucket, two of different blocks
    do with probability 1/dim, as under a fully random hash (the error's variance depends only on
    these pairwise probabilities, the signs being independent), at the cost of one multiply and
    one add per block instead of a scatter per element."""

    def __init__(self, params: Sequence[Tensor], rows: int, *, mode: str, seed: int, dim: int = SKETCH_DIM):
        if dim & (dim - 1):
            raise ValueError(f"the sketch's dimension must be a power of 2, not {dim}")
        self.shapes = [p.numel() for p in params]
        self.offsets = np.concatenate([[0], np.cumsum(self.shapes)]).tolist()
        self.device = params[0].device
        self.mode = mode
        self.seed = seed
        self.dim = dim
        width = self.offsets[-1] if mode == "exact" else 2 * dim  # a rotated block ends before 2·dim
        self.rows = torch.zeros((rows, width), dtype=torch.float32, device=self.device)
        self.cache: dict[tuple[int, int, torch.dtype], Hash] | None = (
            {} if 4 * self.offsets[-1] <= HASH_CACHE_BYTES else None
        )

    def _hash(self, parameter: int, chunk: int, dtype: torch.dtype) -> Hash:
        size = min(_CHUNK, self.shapes[parameter] - chunk * _CHUNK)
        key = (parameter, chunk, dtype)
        if self.cache is not None and key in self.cache:
            return self.cache[key]
        drawn = sketch_hash(self.seed, parameter, chunk, size, dim=self.dim, device=self.device, dtype=dtype)
        if self.cache is not None:
            self.cache[key] = drawn
        return drawn

    def add(self, row: int, grads: Sequence[Tensor | None], *, scale: float = 1.0) -> None:
        """Adds the gradients (any float dtype), divided by `scale`, to `row` in FP32."""
        for parameter, grad in enumerate(grads):
            if grad is None:
                continue
            flat = grad.reshape(-1).to(self.device)
            if self.mode == "exact":
                self.rows[row, self.offsets[parameter] : self.offsets[parameter + 1]].add_(flat, alpha=1 / scale)
                continue
            for chunk, start in enumerate(range(0, len(flat), _CHUNK)):
                signs, shifts = self._hash(parameter, chunk, flat.dtype)
                signed = flat[start : start + _CHUNK].mul(signs)  # exact: a sign flip
                for block, shift in enumerate(shifts):
                    part = signed[block * self.dim : (block + 1) * self.dim]
                    self.rows[row, shift : shift + len(part)].add_(part, alpha=1 / scale)

    def vectors(self) -> Tensor:
        """The rows: exact vectors, or sketches (their rotated blocks wrapped round to `dim` buckets)."""
        if self.mode == "exact":
            return self.rows
        return self.rows[:, : self.dim] + self.rows[:, self.dim :]

    def gram(self) -> np.ndarray:
        """⟨row_a, row_b⟩ for every pair, accumulated in float64 a slice of columns at a time."""
        rows = self.vectors()
        n_rows, width = rows.shape
        total = torch.zeros((n_rows, n_rows), dtype=torch.float64, device=self.device)
        step = max(1, 2**23 // max(n_rows, 1))  # float64 slices of ≤ 64 MiB
        for start in range(0, width, step):
            part = rows[:, start : start + step].double()
            total += part @ part.T
        return total.cpu().numpy()


def rollout_impact(
    model,
    dtype: str,
    rollouts: Sequence[Rollout],
    *,
    logp_old: Tensor,
    advantages: Tensor,
    algo: str,
    temperature: float,
    pad_id: int,
    reference_model=None,
    scale: float = 1.0,
    folds: int = 8,
    seed: int = 0,
    user_batch: int | None = None,
    corrections: Sequence[Correction] = CORRECTIONS,
) -> ImpactResult:
    """`measure_impact` on rollouts (group-major, as engines return them) with the model in `dtype`:
    micro-batches padded by `rescore.pad_batch`, log π by `rescore.response_logprobs` under
    `precision.compute_context`, as the learner's step computes them. The parameters are the model's
    trainable ones (the whole model, or a LoRA adapter's); `reference_model` is an FP32 model with
    the same trainable parameters in the same order, for the trainer's rounding."""
    params = [p for p in model.parameters() if p.requires_grad]
    reference = None
    if reference_model is not None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        ref_names = [n for n, p in reference_model.named_parameters() if p.requires_grad]
        if names != ref_names:
            raise ValueError("the FP32 reference model's trainable parameters differ from the model's")
        ref_params = [p for p in reference_model.parameters() if p.requires_grad]
        reference = (_logp_fn(reference_model, "fp32", rollouts, temperature=temperature, pad_id=pad_id), ref_params)
    batch = ImpactBatch(
        logp_old=logp_old,
        logp_engine=torch.tensor([lp for r in rollouts for lp in r.logp_engine], dtype=torch.float32).to(
            logp_old.device
        ),
        advantages=advantages,
        lengths=[len(r.response_ids) for r in rollouts],
        group_size=group_size(rollouts),
        algo=algo,
        sizes=[len(r.prompt_ids) + len(r.response_ids) for r in rollouts],
    )
    return measure_impact(
        _logp_fn(model, dtype, rollouts, temperature=temperature, pad_id=pad_id),
        params,
        batch,
        folds=folds,
        seed=seed,
        corrections=corrections,
        reference=reference,
        scale=scale,
        user_batch=user_batch,
    )


def _logp_fn(model, dtype: str, rollouts: Sequence[Rollout], *, temperature: float, pad_id: int) -> LogpFn:
    device = input_device(model)

    def logp(indices: list[int]) -> Tensor:
        chosen = [rollouts[i] for i in indices]
        batch = pad_batch([r.prompt_ids for r in chosen], [r.response_ids for r in chosen], pad_id, device)
        with compute_context(dtype, device):
            return response_logprobs(model, batch, temperature).logp

    return logp


def group_size(rollouts: Sequence[Rollout]) -> int:
    """The size of the runs of equal `prompt_index` (group-major order); ValueError if they differ."""
    starts = [i for i, r in enumerate(rollouts) if i == 0 or r.prompt_index != rollouts[i - 1].prompt_index]
    runs = set(np.diff([*starts, len(rollouts)]).tolist())
    if len(runs) != 1:
        raise ValueError(f"the rollouts are not consecutive groups of one size (sizes {sorted(runs)})")
    return runs.pop()
