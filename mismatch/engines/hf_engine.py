"""transformers `generate` as an engine: KV cache, the engine dtype, the same outputs as vLLM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig

from mismatch.engines.base import RowPlan, Rows
from mismatch.errors import EngineError
from mismatch.model.loading import load_causal_lm
from mismatch.model.lora import adapter_weights, with_adapter
from mismatch.model.precision import DTYPES, compute_context, default_device
from mismatch.records import Advance, Rollout, Sampling, Scored, request_seed, requests

BATCH = 16


class HFEngine:
    name = "hf"
    execution = "eager"  # transformers' generate, op by op

    def __init__(self, model: Path, dtype: str, *, trust_remote_code: bool = False, lora: Path | None = None):
        self.dtype = dtype
        self.device = default_device()
        self.model = load_causal_lm(model, DTYPES[dtype], trust_remote_code=trust_remote_code)
        if lora:
            self.model = with_adapter(self.model, lora)
        self.model = self.model.to(self.device).eval()
        config = self.model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else self.model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else min(self.eos_ids, default=0)
        # transformers fills every field a call leaves unset from the model's generation_config
        # (repetition_penalty, top_k, min_p …): a bare one leaves exactly the processors the trainer applies.
        self.model.generation_config = GenerationConfig(
            eos_token_id=sorted(self.eos_ids) or None, pad_token_id=self.pad_id
        )

    def generate(
        self, prompts: list[list[int]], samples: int, sampling: Sampling, progress: Advance | None = None
    ) -> list[Rollout]:
        return self.generate_rows(prompts, samples, sampling, {}, progress)[0]

    def generate_rows(
        self, prompts: list[list[int]], samples: int, sampling: Sampling, plan: RowPlan, progress: Advance | None = None
    ) -> tuple[list[Rollout], Rows | str]:
        """`generate`, keeping the log-softmax of generate's processed scores (the distribution each token
        was sampled from) at the `plan`'s positions."""
        todo = requests(len(prompts), samples)
        rollouts: list[Rollout] = []
        recorded: list[tuple[int, int, torch.Tensor]] = []
        for start in range(0, len(todo), BATCH):
            chunk = todo[start : start + BATCH]
            wanted = {r - start: plan[r] for r in range(start, start + len(chunk)) if r in plan}
            # One seed per batch (torch's generator is global); batching is fixed, so runs repeat.
            torch.manual_seed(request_seed(sampling, *chunk[0], samples))
            batch, rows = self._generate_batch([prompts[p] for p, _ in chunk], chunk, sampling, wanted)
            rollouts += batch
            recorded += [(start + row, position, logp) for row, position, logp in rows]
            if progress:
                progress(len(chunk))
        vocab = self.model.config.get_text_config().vocab_size
        return rollouts, Rows(
            np.array([r for r, _, _ in recorded], dtype=np.int64),
            np.array([p for _, p, _ in recorded], dtype=np.int64),
            torch.stack([x for _, _, x in recorded]).numpy() if recorded else np.empty((0, vocab), np.float32),
        ).within(rollouts)

    @torch.inference_mode()
    def _generate_batch(
        self, prompts: list[list[int]], keys: list[tuple[int, int]], sampling: Sampling, wanted: RowPlan
    ) -> tuple[list[Rollout], list[tuple[int, int, torch.Tensor]]]:
        """The batch's rollouts, and (row, position, log-probability row) at each position `wanted` per row
        that generate reached."""
        width = max(map(len, prompts))
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        config = GenerationConfig(
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            remove_invalid_values=True,  # FP16 overflow: sample on, the non-finite log-probs get counted
            max_new_tokens=sampling.max_tokens,
            eos_token_id=sorted(self.eos_ids) or None,
            pad_token_id=self.pad_id,
            output_scores=True,  # processed scores: after temperature and top-p, as sampled
            return_dict_in_generate=True,
        )
        with compute_context(self.dtype, self.device):
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        new_tokens = out.sequences[:, width:]
        steps = [torch.log_softmax(s.float(), -1).gather(-1, new_tokens[:, i, None]) for i, s in enumerate(out.scores)]
        logps = torch.cat(steps, dim=1)
        rows = [
            (row, position, torch.log_softmax(out.scores[position][row].float(), -1).cpu())
            for row, positions in wanted.items()
            for position in positions
            if position < len(out.scores)
        ]
        rollouts = []
        for row, ((p, s), prompt) in enumerate(zip(keys, prompts, strict=True)):
            ids = new_tokens[row].tolist()
            end = next((i + 1 for i, t in enumerate(ids) if t in self.eos_ids), None)
            ids = ids[:end] if end else ids
            rollouts.append(
                Rollout(
                    prompt_index=p,
                    sample_index=s,
                    prompt_ids=prompt,
                    response_ids=ids,
                    logp_engine=logps[row, : len(ids)].tolist(),
                    finish_reason="stop" if end else "length",
                )
            )
        return rollouts, rows

    def score(self, sequences: list[tuple[list[int], list[int]]], topk: int = 0, alone: bool = False) -> list[Scored]:
        raise EngineError(
            "the hf engine has no separate prefill path to score: its prefill is the trainer's forward; "
            "use --engine vllm"
        )

    def load_adapter(self, path: Path) -> None:
        weights = adapter_weights(path)
        if unknown := sorted(set(weights) - dict(self.model.named_parameters()).keys()):
            raise EngineError(
                f"the adapter in {path} does not fit the one the hf engine started with "
                f"({len(unknown)} tensors unknown, first {unknown[0]})"
            )
        self.load_weights(weights)

    @torch.no_grad()
    def load_weights(self, state_dict: dict) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in state_dict.items():
            if name in params:
                params[name].copy_(tensor)

    def sleep(self) -> None:
        """Nothing to give back that the learner could use: the HF engine is a model copy, not a pool."""

    def wake_up(self) -> None:
        pass

    def close(self) -> None:
        del self.model
