"""MoE routing agreement: does the engine send a token to the same top-k experts as the trainer?

The engine's side is recorded in `engines.vllm_routing` (where vLLM's own record and its layout
are described); this module has the trainer's side and the comparison.

Positions: the log-prob of response token i is computed at input position len(prompt) + i − 1, so
the routing that matters for token i is that row (`response_rows`). That is the first-order
attribution only: a flip at an earlier position also changes the keys and values later tokens
attend to.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mismatch.errors import ModelError
from mismatch.model.precision import DTYPES, compute_context
from mismatch.model.rescore import PaddedBatch
from mismatch.records import Rollout, response_rows


@dataclass
class Routing:
    """The trainer's routing of each sequence over the MoE layers only: at every position, rows as the
    engine's `routed_experts` (positions 0 … n − 2 of a sequence of n real tokens), from
    `trainer_routing`; or at the response tokens' scoring positions, from `response_routing`."""

    layers: list[int]  # decoder-layer index of each MoE layer: the engine's layer axis is every decoder layer
    experts: list[np.ndarray]  # per sequence [positions, MoE layers, k] int16, expert ids sorted ascending
    # per sequence [positions, MoE layers] float32, p₍ₖ₎ − p₍ₖ₊₁₎ (inf when k = number of experts)
    margin: list[np.ndarray]


def routers(model) -> list[tuple[int, torch.nn.Module, int]]:
    """(decoder layer, router module, index of the logits in its output) of every MoE layer, found as
    transformers finds what it records as `router_logits` (the model's `_can_record_outputs`)."""
    from transformers.utils.output_capturing import OutputRecorder

    spec = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")
    if not isinstance(spec, OutputRecorder) or spec.target_class is None:
        raise ModelError(f"{type(model).__name__}: no MoE router found (transformers records no router_logits for it)")
    found = []
    for name, module in model.named_modules():
        if isinstance(module, spec.target_class) and (
            spec.layer_name is None or f".{spec.layer_name.strip('.')}." in name + "."
        ):
            layer = re.search(r"\.(\d+)\.", name + ".")
            if layer is None:
                raise ModelError(f"{type(model).__name__}: router {name} is not inside a numbered decoder layer")
            found.append((int(layer.group(1)), module, spec.index))
    return found


@torch.inference_mode()
def trainer_routing(model, batch: PaddedBatch) -> Routing:
    """The HF model's routing of every real position of `batch`, captured by hooks on its routers.

    As Qwen3-MoE, Mixtral (and the other softmax-top-k routers) compute it: probabilities p =
    softmax(router logits in FP32), experts = topk(p, k) with k = num_experts_per_tok — the same
    `torch.topk` over the same tensor, so ties break as in the model. Where the router also returns
    the ids it chose, they must be those sets (else ModelError: a routing rule this does not
    reproduce). The forward runs as `rescore` runs it: in the model's dtype under `compute_context`.
    """
    top_k = model.config.get_text_config().num_experts_per_tok
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def recorder(layer: int, index: int):
        """The forward hook of the router of decoder layer `layer`, its logits at `index` of its output."""

        def record(module, args, output) -> None:
            logits = output[index] if isinstance(output, tuple) else output
            probs = logits.reshape(-1, logits.shape[-1]).float().softmax(dim=-1)
            ids = probs.topk(top_k, dim=-1).indices.sort(dim=-1).values
            own = (
                [
                    o
                    for o in output
                    if isinstance(o, torch.Tensor) and not o.is_floating_point() and o.shape[-1] == top_k
                ]
                if isinstance(output, tuple)
                else []
            )
            if own and not torch.equal(own[-1].reshape(ids.shape).sort(dim=-1).values, ids):
                raise ModelError(
                    f"{type(model).__name__}: its router (layer {layer}) does not route by softmax top-k; "
                    "routing agreement cannot reproduce it"
                )
            if probs.shape[-1] > top_k:
                best = probs.topk(top_k + 1, dim=-1).values
                margin = best[:, top_k - 1] - best[:, top_k]
            else:
                margin = torch.full(ids.shape[:1], float("inf"), device=ids.device)
            captured[layer] = (ids, margin)

        return record

    found = routers(model)
    handles = [module.register_forward_hook(recorder(layer, index)) for layer, module, index in found]
    dtype = {torch_dtype: name for name, torch_dtype in DTYPES.items()}[model.dtype]
    try:
        with compute_context(dtype, batch.input_ids.device):
            model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    layers = sorted(captured)
    shape = batch.input_ids.shape
    experts = torch.stack([captured[layer][0].cpu() for layer in layers], dim=1).reshape(*shape, len(layers), top_k)
    margin = torch.stack([captured[layer][1].cpu() for layer in layers], dim=1).reshape(*shape, len(layers))
    lengths = batch.attention_mask.sum(dim=1).tolist()
    return Routing(
        layers,
        [experts[b, : n - 1].numpy().astype(np.int16) for b, n in enumerate(lengths)],
        [margin[b, : n - 1].numpy() for b, n in enumerate(lengths)],
    )


def same_experts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[positions, layers] bool: whether the top-k expert sets are equal, sort(a[p, l]) = sort(b[p, l])
    (order-insensitive), from two [positions, layers, k] arrays of expert ids."""
    return (np.sort(a, axis=-1) == np.sort(b, axis=-1)).all(axis=-1)


def agreement_by_layer(same: np.ndarray, layers: Sequence[int]) -> list[dict]:
    """Per MoE layer l (`layers[j]` its decoder-layer index, column j of `same`, [positions, layers]
    bool): agree = Σₚ same[p, j], share = agree / positions."""
    positions = same.shape[0]
    agree = same.sum(axis=0)
    return [
        {
            "layer": int(layer),
            "share": float(agree[j]) / positions if positions else float("nan"),
            "agree": int(agree[j]),
            "positions": positions,
        }
        for j, layer in enumerate(layers)
    ]


def routing_and_gap(log_ratio: np.ndarray, differs: np.ndarray) -> dict[str, float]:
    """How much of the trainer–engine gap the tokens whose routing differs carry.

    ℓ = log π − log μ per response token; D the tokens whose routing differs at their scoring
    position in any layer (`~same_experts(...).all(axis=1)` over response rows), N all tokens.
      share_tokens   = |D| / |N|
      mean_abs_*     = mean |ℓ| over D (`differs`) and over N \\ D (`same`); nan where empty
      share_abs      = Σ_D |ℓ| / Σ_N |ℓ|
      share_sq       = Σ_D ℓ² / Σ_N ℓ²
    share_sq is the one to quote: ℓ² / 2 is k2's term and k3's to second order (e^ℓ − 1 − ℓ ≈ ℓ² / 2),
    so it is the share of the KL estimate these tokens carry. share_abs weighs the many small |ℓ|
    of same-routed tokens more; a routing flip shows as share_sq ≫ share_tokens.
    """
    size = np.abs(np.asarray(log_ratio, dtype=np.float64))
    differs = np.asarray(differs, dtype=bool)

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if values.size else float("nan")

    def share(values: np.ndarray) -> float:
        total = values.sum()
        return float(values[differs].sum() / total) if total > 0 else float("nan")

    return {
        "tokens": int(size.size),
        "differs": int(differs.sum()),
        "share_tokens": mean(differs.astype(np.float64)),
        "mean_abs_differs": mean(size[differs]),
        "mean_abs_same": mean(size[~differs]),
        "share_abs": share(size),
        "share_sq": share(size**2),
    }


def is_moe(model_path, trust_remote_code: bool = False) -> bool:
    """Whether the model routes tokens to experts (its config names a top-k)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).get_text_config()
    return bool(getattr(config, "num_experts_per_tok", 0))


def response_routing(model, rollouts: Sequence[Rollout], pad_id: int = 0) -> Routing:
    """The trainer's routing at each rollout's response-token scoring positions (per rollout experts
    [response tokens, MoE layers, k] and margins [response tokens, MoE layers]), the sequences
    batched as `rescore` batches them."""
    from mismatch.model.rescore import BATCH_TOKENS, input_device, pad_batch, token_batches

    device = input_device(model)
    order = sorted(range(len(rollouts)), key=lambda i: len(rollouts[i].prompt_ids) + len(rollouts[i].response_ids))
    experts: list[np.ndarray] = [np.empty(0)] * len(rollouts)
    margins: list[np.ndarray] = [np.empty(0)] * len(rollouts)
    layers: list[int] = []
    for group in token_batches(order, rollouts, BATCH_TOKENS):
        chosen = [rollouts[i] for i in group]
        routing = trainer_routing(
            model, pad_batch([r.prompt_ids for r in chosen], [r.response_ids for r in chosen], pad_id, device)
        )
        layers = routing.layers
        for i, rollout, rows, margin in zip(group, chosen, routing.experts, routing.margin, strict=True):
            experts[i] = response_rows(rows, len(rollout.prompt_ids))
            margins[i] = response_rows(margin, len(rollout.prompt_ids))
    return Routing(layers=layers, experts=experts, margin=margins)


def agreement_rows(frame, tokens) -> dict[str, list[dict]]:
    """summary.json `routing` from routing.parquet's rows (`frame`) and the tokens' ℓ:
    - `by_layer`: per pair and MoE layer, the share of response positions whose engine and trainer
      top-k sets are equal (`agreement_by_layer`);
    - `trainer_vs_fp32`: per pair whose trainer is not FP32, per layer, the same between that
      trainer and the FP32 trainer on the same tokens: the router's own precision sensitivity;
    - `gap`: per pair, `routing_and_gap` over its tokens (routing differs in any layer), with the
      median router margin of the positions whose routing differs and of those whose does not.
    """
    frame = frame.assign(same=_same_rows(frame["engine_experts"], frame["trainer_experts"]))
    by_layer: list[dict] = []
    versus_fp32: list[dict] = []
    gap: list[dict] = []
    for (e, t), rows in frame.groupby(["engine_dtype", "trainer_dtype"], sort=False):
        pivot = rows.pivot_table(index=["seq_id", "position"], columns="layer", values="same", aggfunc="first")
        by_layer += [
            {"engine_dtype": e, "trainer_dtype": t} | row
            for row in agreement_by_layer(pivot.to_numpy(dtype=bool), list(pivot.columns))
        ]
        per_token = pivot.all(axis=1).rename("routing_same").reset_index()
        scored = tokens[(tokens["engine_dtype"] == e) & (tokens["trainer_dtype"] == t)].merge(
            per_token, on=["seq_id", "position"]
        )
        finite = np.isfinite(scored["logp_trainer"]) & np.isfinite(scored["logp_engine"])
        scored = scored[finite]
        margin = rows.groupby(["seq_id", "position"])["trainer_margin"].min().rename("margin").reset_index()
        scored = scored.merge(margin, on=["seq_id", "position"])
        differs = ~scored["routing_same"].to_numpy(dtype=bool)
        gap.append(
            {"engine_dtype": e, "trainer_dtype": t}
            | routing_and_gap((scored["logp_trainer"] - scored["logp_engine"]).to_numpy(), differs)
            | {
                "median_margin_differs": _median(scored["margin"].to_numpy()[differs]),
                "median_margin_same": _median(scored["margin"].to_numpy()[~differs]),
            }
        )
        reference = frame[(frame["engine_dtype"] == e) & (frame["trainer_dtype"] == "fp32")]
        if t != "fp32" and len(reference):
            both = rows.merge(reference, on=["seq_id", "position", "layer"], suffixes=("", "_fp32"))
            both = both.assign(same_fp32=_same_rows(both["trainer_experts"], both["trainer_experts_fp32"]))
            table = both.pivot_table(index=["seq_id", "position"], columns="layer", values="same_fp32", aggfunc="first")
            versus_fp32 += [
                {"engine_dtype": e, "trainer_dtype": t} | row
                for row in agreement_by_layer(table.to_numpy(dtype=bool), list(table.columns))
            ]
    return {"by_layer": by_layer, "trainer_vs_fp32": versus_fp32, "gap": gap}


def _same_rows(a, b) -> np.ndarray:
    """`same_experts` over two columns of routing.parquet (one expert list per row)."""
    return same_experts(np.stack(a.to_numpy()), np.stack(b.to_numpy())) if len(a) else np.zeros(0, dtype=bool)


def _median(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else float("nan")
