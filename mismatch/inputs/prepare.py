"""The first stage of scan and diagnose: the prompts as token ids that fit the model's context."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mismatch.config import DEFAULT_NUM_PROMPTS, ScanConfig
from mismatch.errors import PromptError
from mismatch.inputs.prompts import encode_prompts, read_prompts
from mismatch.model.loading import load_tokenizer, resolve_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Inputs:
    model_path: Path
    tokenizer: PreTrainedTokenizerBase
    prompt_ids: list[list[int]]  # the prompts that fit, in order
    skipped: list[int]  # indices of the prompts that do not fit
    answers: list[str | None]  # of the prompts that fit (None: the prompt has no answer)


def prepare_inputs(config: ScanConfig) -> Inputs:
    prompts = read_prompts(
        config.prompt_set(), n=config.num_prompts, builtin_n=DEFAULT_NUM_PROMPTS, seed=config.sampling.seed
    )
    model_path = resolve_model(config.model, trust_remote_code=config.trust_remote_code)
    tokenizer = load_tokenizer(model_path, trust_remote_code=config.trust_remote_code)
    prompt_ids = encode_prompts(tokenizer, prompts, chat_template=config.chat_template)
    kept, skipped = fit_context(
        prompt_ids, context_length(model_path, config), config.sampling.max_tokens, config.strict
    )
    left_out = set(skipped)
    answers = [p.answer for i, p in enumerate(prompts) if i not in left_out]
    return Inputs(model_path, tokenizer, kept, skipped, answers)


def context_length(model_path, config: ScanConfig) -> int | None:
    if config.max_model_len:
        return config.max_model_len
    from transformers import AutoConfig

    return getattr(
        AutoConfig.from_pretrained(model_path, trust_remote_code=config.trust_remote_code),
        "max_position_embeddings",
        None,
    )


def fit_context(
    prompt_ids: list[list[int]], context: int | None, max_tokens: int, strict: bool
) -> tuple[list[list[int]], list[int]]:
    """Drop prompts that leave no room for `max_tokens` in the context; their indices are returned."""
    if context is None:
        return prompt_ids, []
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) + max_tokens > context]
    if too_long and (strict or len(too_long) == len(prompt_ids)):
        raise PromptError(
            f"{len(too_long)} of {len(prompt_ids)} prompt(s) do not fit the context ({context} tokens) "
            f"with --max-tokens {max_tokens} "
            f"(first: prompt {too_long[0]}, {len(prompt_ids[too_long[0]])} tokens); shorten them or lower --max-tokens"
            + ("" if strict else "; nothing left to scan")
        )
    dropped = set(too_long)
    kept = [ids for i, ids in enumerate(prompt_ids) if i not in dropped]
    return kept, too_long
