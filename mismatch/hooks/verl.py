"""Dump μ and π from a verl run: one open-format file per training step.

Call it in `RayPPOTrainer.fit` (verl/trainer/ppo/ray_trainer.py) right after the old log-probs
join the batch (`batch = batch.union(old_log_prob)`, where verl itself calls
`calculate_debug_metrics`), with `actor_rollout_ref.rollout.calculate_log_probs=True`:

    from mismatch.hooks.verl import dump_verl_batch
    dump_verl_batch(batch, self.global_steps, "<out>/mismatch", entropys=entropys)

then run `mismatch analyze <out>/mismatch`. Not in bypass mode (`algorithm.rollout_correction.
bypass_mode`), where verl sets old_log_probs = rollout_log_probs and π − μ is zero by construction.
`entropys` (optional): the per-token entropies verl's `compute_log_prob` returned with the old
log-probs and `fit` pops just before the union (the local `entropys`): the `entropy` column, the gap
by entropy bucket and why it grows.

Layout read, as in volcengine/verl (b178a3c): `prompts` (left-padded) and `responses`
(right-padded) from verl/experimental/agent_loop/agent_loop.py `_postprocess`; `response_mask`
(0 on tool tokens), else `attention_mask[:, -response_length:]` as `compute_response_mask` in
ray_trainer.py; `rollout_log_probs` (μ) and `old_log_probs` (π) as read by
verl/utils/debug/metrics.py `calculate_debug_metrics`; `non_tensor_batch["uid"]` (one per prompt,
repeated over its `rollout.n` samples) and `meta_info["temperature"]`, set in `fit`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mismatch.dumps.writer import StepWriter
from mismatch.errors import DumpError


def dump_verl_batch(
    batch: Any,
    step: int,
    out_dir: str | Path,
    *,
    entropys: Any = None,
    rank: int = 0,
    world_size: int = 1,
) -> Path | None:
    """Write the batch's sequences as `step`, each response up to its padding with `loss_mask` =
    response_mask (0 on tool tokens, which are then not measured); returns the file written."""
    tensors = batch.batch
    if "rollout_log_probs" not in tensors.keys():
        raise DumpError(
            "the batch has no rollout_log_probs (μ): set actor_rollout_ref.rollout.calculate_log_probs=True"
        )
    prompts = tensors["prompts"].cpu()
    responses = tensors["responses"].cpu()
    attention_mask = tensors["attention_mask"].cpu()
    valid = attention_mask[:, -responses.size(1) :].bool()  # the response before padding (tool output included)
    mask = tensors["response_mask"].bool().cpu() if "response_mask" in tensors.keys() else valid
    prompt_mask = attention_mask[:, : prompts.size(1)].bool()
    mu = tensors["rollout_log_probs"].float().cpu()
    pi = tensors["old_log_probs"].float().cpu()
    entropy = None if entropys is None else entropys.float().cpu()

    groups: dict[Any, int] = {}  # uid → prompt_index, by first appearance (balance_batch reorders rows)
    prompt_index = [groups.setdefault(uid, len(groups)) for uid in batch.non_tensor_batch["uid"]]
    keep = [i for i in range(len(mask)) if mask[i].any()]  # an all-masked row has no token to measure
    writer = StepWriter(out_dir, rank, world_size)
    writer.add(
        step,
        prompt_ids=[prompts[i][prompt_mask[i]].tolist() for i in keep],
        response_ids=[responses[i][valid[i]].tolist() for i in keep],
        logp_engine=[mu[i][valid[i]].tolist() for i in keep],
        logp_trainer=[pi[i][valid[i]].tolist() for i in keep],
        prompt_index=[prompt_index[i] for i in keep],
        temperature=getattr(batch, "meta_info", {}).get("temperature"),
        loss_mask=[mask[i][valid[i]].tolist() for i in keep],
        entropy=None if entropy is None else [entropy[i][valid[i]].tolist() for i in keep],
    )
    return writer.flush()
