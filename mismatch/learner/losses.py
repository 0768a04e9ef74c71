"""Policy losses over padded [sequences, tokens] tensors; each returns a scalar to minimise.

Notation: logp = log π_θ (with grad), logp_old = log π_θ′ (the learner's recompute before the
update), logp_engine = log μ (the rollout engine), adv = group-normalised advantage per sequence
[B], mask = 1 on response tokens. Token losses are averaged over all response tokens of the batch.
Each loss takes logp, the tensor differentiated, then the batch's tensors by name.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS_CLIP = 0.2
GSPO_EPS = (3e-4, 4e-4)  # GSPO paper's sequence-ratio clip range
TIS_CAP = 2.0
MIS_CAP = 10.0


def to_padded(flat: Tensor, lengths: list[int]) -> Tensor:
    """Flat per-token values, sequences end to end → [sequences, max length], zero-padded on the right."""
    return torch.nn.utils.rnn.pad_sequence(list(torch.split(flat, lengths)), batch_first=True)


def token_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _ppo_clip_terms(logp, logp_old, adv, mask) -> Tensor:
    """Per token: −min(r·A, clip(r, 1−ε, 1+ε)·A) with r = π_θ / π_θ′."""
    ratio = torch.exp((logp - logp_old) * mask)
    adv = adv[:, None]
    return -torch.minimum(ratio * adv, ratio.clamp(1 - EPS_CLIP, 1 + EPS_CLIP) * adv)


def _sequence_log_ratio(logp_old, logp_engine, mask) -> Tensor:
    """log ρ per sequence, ρ = Π_t π_θ′ / μ."""
    return ((logp_old - logp_engine) * mask).sum(-1)


def grpo(logp: Tensor, *, logp_old: Tensor, logp_engine: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """PPO-clip on π_θ / π_θ′ (ε = 0.2); μ is ignored."""
    return token_mean(_ppo_clip_terms(logp, logp_old, adv, mask), mask)


def gspo(logp: Tensor, *, logp_old: Tensor, logp_engine: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """Sequence ratio s = exp(mean_t log(π_θ / π_θ′)), clipped to [1 − 3e-4, 1 + 4e-4]; mean over sequences."""
    lengths = mask.sum(-1).clamp(min=1)
    s = torch.exp(((logp - logp_old) * mask).sum(-1) / lengths)
    low, high = GSPO_EPS
    return (-torch.minimum(s * adv, s.clamp(1 - low, 1 + high) * adv)).mean()


def token_tis(logp: Tensor, *, logp_old: Tensor, logp_engine: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """GRPO × min(π_θ′ / μ, C) per token, C = 2 (truncated importance sampling)."""
    weight = torch.exp(logp_old - logp_engine).clamp(max=TIS_CAP).detach()
    return token_mean(_ppo_clip_terms(logp, logp_old, adv, mask) * weight, mask)


def seq_mis(logp: Tensor, *, logp_old: Tensor, logp_engine: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """GRPO × ρ·1[ρ ≤ C] with ρ = Π π_θ′ / μ over the sequence, C = 10: masked, not truncated."""
    rho = torch.exp(_sequence_log_ratio(logp_old, logp_engine, mask)).detach()
    weight = torch.where(rho <= MIS_CAP, rho, torch.zeros_like(rho))
    return token_mean(_ppo_clip_terms(logp, logp_old, adv, mask) * weight[:, None], mask)


def pg_seq_is(logp: Tensor, *, logp_old: Tensor, logp_engine: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """Vanilla policy gradient weighted by the sequence ratio: −ρ·A·Σ_t log π_θ, per token of the batch."""
    rho = torch.exp(_sequence_log_ratio(logp_old, logp_engine, mask)).detach()
    return -((rho * adv)[:, None] * logp * mask).sum() / mask.sum().clamp(min=1)


LOSSES = {"grpo": grpo, "gspo": gspo, "token-tis": token_tis, "seq-mis": seq_mis, "pg-seq-is": pg_seq_is}


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """(r − mean of its group) / (std of its group + eps); groups are consecutive `group_size` rows."""
    groups = rewards.view(-1, group_size)
    return ((groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + eps)).view(-1)
