import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mismatch.model import precision
from mismatch.model.precision import GPUNumerics, compute_context
from mismatch.model.rescore import load_trainer, pad_batch, rescore, response_logprobs, top_p_filter
from mismatch.records import Rollout, parse_dtypes
from mismatch.stats import metrics


def _rollouts(n=5):
    rng = np.random.default_rng(0)
    return [
        Rollout(
            prompt_index=i,
            sample_index=0,
            prompt_ids=rng.integers(3, 300, size=3 + 2 * i).tolist(),
            response_ids=rng.integers(3, 300, size=9 - i).tolist(),
            logp_engine=[0.0] * (9 - i),
            finish_reason="length",
        )
        for i in range(n)
    ]


def test_logprobs_equal_a_plain_forward_per_sequence(tiny_model):
    model = load_trainer(tiny_model, "fp32")
    rollouts = _rollouts()
    batched = rescore(model, "fp32", rollouts, temperature=0.7)["logp_trainer"]
    for rollout, got in zip(rollouts, batched, strict=True):
        ids = torch.tensor([rollout.prompt_ids + rollout.response_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(rollout.prompt_ids) - 1 : -1].float()
        want = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(rollout.response_ids)[:, None]).squeeze(-1)
        assert got.dtype == np.float64 and got.shape == (len(rollout.response_ids),)
        np.testing.assert_allclose(got, want.numpy(), atol=2e-5)


def test_padding_does_not_change_results(tiny_model):
    model = load_trainer(tiny_model, "bf16")
    rollouts = _rollouts()
    together = rescore(model, "bf16", rollouts, temperature=1.0)["logp_trainer"]
    alone = [rescore(model, "bf16", [r], temperature=1.0)["logp_trainer"][0] for r in rollouts]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-2)  # bf16: kernels may block differently per shape


def test_pad_batch_rows_point_at_the_position_before_each_response_token():
    batch = pad_batch([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0, device=torch.device("cpu"))
    assert batch.input_ids.tolist() == [[1, 2, 4, 5, 6], [3, 7, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.rows.tolist() == [1, 2, 3, 5] and batch.targets.tolist() == [4, 5, 6, 7]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    assert torch.isinf(top_p_filter(logits, 0.75)).tolist() == [[True, False, False]]
    assert torch.isinf(top_p_filter(logits, 0.5)).tolist() == [[True, False, True]]
    assert not torch.isinf(top_p_filter(logits, 1.0)).any()


def test_top_p_keeps_both_distributions_and_the_kept_mass(tiny_model):
    model = load_trainer(tiny_model, "fp32")
    rollouts = _rollouts()
    batch = pad_batch([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], 0, torch.device("cpu"))
    with torch.no_grad():
        full = response_logprobs(model, batch, 0.8)
        nucleus = response_logprobs(model, batch, 0.8, top_p=0.5)
    assert torch.equal(full.logp, full.logp_full) and torch.all(full.log_kept_mass == 0)
    torch.testing.assert_close(nucleus.logp_full, full.logp)  # the whole tempered distribution either way
    inside = torch.isfinite(nucleus.logp)
    assert inside.any() and (~inside).any()  # random weights: some sampled tokens fall outside a 0.5 nucleus
    assert torch.all(nucleus.log_kept_mass < 0)
    torch.testing.assert_close(nucleus.logp[inside], (nucleus.logp_full - nucleus.log_kept_mass)[inside])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_matmul_is_fp32_accumulation_rounded_to_the_16_bit_type(dtype):
    torch.manual_seed(0)
    x, w = torch.randn(8, 64).to(dtype), torch.randn(32, 64).to(dtype)
    with GPUNumerics(dtype, emulate_matmuls=True):
        got = F.linear(x, w)
        scores = x @ w.T
    want = F.linear(x.float(), w.float()).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want) and torch.equal(scores, want)


def test_native_matmuls_stay_the_cpus_own():
    torch.manual_seed(0)
    x, w = torch.randn(8, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    with GPUNumerics(torch.bfloat16, emulate_matmuls=False):
        got = F.linear(x, w)
    assert torch.equal(got, F.linear(x, w))


def test_every_matmul_like_op_is_emulated_and_goes_through_fp32():
    """addmm (GPT-2's Conv1D), mm, einsum and the MoE grouped matmul: FP16 in, FP32 accumulation, FP16 out."""
    torch.manual_seed(0)
    a, b, bias = torch.randn(16, 32).half(), torch.randn(32, 24).half(), torch.randn(24).half()
    experts, offsets = torch.randn(3, 32, 24).half(), torch.tensor([5, 11, 16], dtype=torch.int32)
    with GPUNumerics(torch.float16, emulate_matmuls=True):
        got = {
            "addmm": torch.addmm(bias, a, b),
            "mm": torch.mm(a, b),
            "Tensor.addmm": bias.expand(16, 24).addmm(a, b),
            "einsum": torch.einsum("ij,jk->ik", a, b),
            "einsum list": torch.einsum("ij,jk->ik", [a, b]),
        }
        grouped = F.grouped_mm(a, experts, offs=offsets) if hasattr(F, "grouped_mm") else None
    want = (a.float() @ b.float()).half()
    assert all(v.dtype == torch.float16 for v in got.values())
    for name in ("mm", "einsum", "einsum list"):
        assert torch.equal(got[name], want), name
    assert torch.equal(got["addmm"], torch.addmm(bias.float(), a.float(), b.float()).half())
    if grouped is not None:
        rows = [
            a[s:e].float() @ experts[i].float() for i, (s, e) in enumerate(zip([0, 5, 11], [5, 11, 16], strict=True))
        ]
        assert grouped.dtype == torch.float16 and torch.allclose(
            grouped.float(), torch.cat(rows).half().float(), rtol=0, atol=1e-2
        )


@pytest.mark.parametrize(
    ("dtype", "emulate_matmuls"), [(torch.float16, True), (torch.bfloat16, True), (torch.bfloat16, False)]
)
def test_attention_rounds_the_probabilities_like_flash_attention(dtype, emulate_matmuls):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 9, 16).to(dtype) for _ in range(3))
    with GPUNumerics(dtype, emulate_matmuls=emulate_matmuls):
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # by hand: FP32 scores and softmax statistics; exp(s − max) rounded to the 16-bit type before P·V; unrounded row sum
    scores = (q.float() @ k.float().transpose(-2, -1)) / 4 + torch.full((9, 9), float("-inf")).triu(1)
    unnormalised = torch.exp(scores - scores.amax(-1, keepdim=True))
    want = ((unnormalised.to(dtype).float() @ v.float()) / unnormalised.sum(-1, keepdim=True)).to(dtype)
    unrounded = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    assert not torch.equal(got, unrounded)  # keeping the probabilities in FP32 would flatter the 16-bit type
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    with GPUNumerics(dtype, emulate_matmuls=emulate_matmuls):
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        grouped = F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], is_causal=True, enable_gqa=True)
        repeated = F.scaled_dot_product_attention(
            q, k[:, :2].repeat_interleave(2, 1), v[:, :2].repeat_interleave(2, 1), is_causal=True
        )
    assert torch.equal(masked, got)  # a boolean mask is the causal mask here
    assert torch.equal(grouped, repeated)  # grouped-query heads share their key/value head


def test_bf16_matmuls_are_native_only_where_the_cpu_multiplies_bf16(monkeypatch):
    cpu = torch.device("cpu")
    for flags, native in (
        ({"avx512_bf16": True, "amx_bf16": False}, True),
        ({"avx512_bf16": False, "amx_bf16": True}, True),
        ({"avx512_bf16": False, "amx_bf16": False}, False),
    ):
        monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: flags)
        assert compute_context("bf16", cpu).emulate_matmuls is not native
        assert compute_context("fp16", cpu).emulate_matmuls  # no CPU path here multiplies FP16 natively
        assert ("native bf16 GEMMs" in precision.trainer_kernels("bf16", cpu)) is native
    assert not isinstance(compute_context("fp32", cpu), GPUNumerics)


def test_trainer_bf16_gap_is_the_same_on_both_cpu_paths(tiny_model, monkeypatch):
    """The trainer's BF16-against-FP32 k3 on the same tokens, with native BF16 GEMMs (AVX512-BF16, AMX)
    and with FP32 GEMMs over BF16 values (elsewhere): each inside the other's bootstrap interval."""
    rng = np.random.default_rng(5)
    rollouts = [
        Rollout(
            prompt_index=i,
            sample_index=0,
            prompt_ids=rng.integers(3, 300, size=6).tolist(),
            response_ids=rng.integers(3, 300, size=40).tolist(),
            logp_engine=[0.0] * 40,
            finish_reason="length",
        )
        for i in range(48)
    ]
    reference = np.concatenate(rescore(load_trainer(tiny_model, "fp32"), "fp32", rollouts, 1.0)["logp_trainer"])
    bf16 = load_trainer(tiny_model, "bf16")
    clusters = np.repeat(np.arange(len(rollouts)), 40)
    gaps = {}
    for native in (True, False):
        monkeypatch.setattr(precision, "cpu_flags", lambda native=native: {"avx512_bf16": native, "amx_bf16": False})
        logp = np.concatenate(rescore(bf16, "bf16", rollouts, 1.0)["logp_trainer"])
        terms = metrics.k3_terms(reference, logp)
        gaps[native] = (terms.mean(), *metrics.bootstrap_mean_ci(terms, clusters))
    (native_k3, native_low, native_high), (emulated_k3, emulated_low, emulated_high) = gaps[True], gaps[False]
    assert native_low <= emulated_k3 <= native_high and emulated_low <= native_k3 <= emulated_high
    assert min(native_k3, emulated_k3) > 1e-6  # a BF16 gap, far above FP32 rounding


def test_emulated_fp16_forward_matches_native_fp16(tiny_model):
    fp16, fp32 = load_trainer(tiny_model, "fp16"), load_trainer(tiny_model, "fp32")
    rollouts = _rollouts(3)
    emulated = np.concatenate(rescore(fp16, "fp16", rollouts, 1.0)["logp_trainer"])  # on CPU: the emulated path
    with torch.inference_mode():
        native = [
            response_logprobs(fp16, pad_batch([r.prompt_ids], [r.response_ids], 0, torch.device("cpu")), 1.0).logp
            for r in rollouts
        ]
    native = torch.cat(native).double().numpy()
    reference = np.concatenate(rescore(fp32, "fp32", rollouts, 1.0)["logp_trainer"])
    assert np.abs(emulated - native).max() < 1e-2
    assert np.abs(emulated - reference).max() < 1e-2


def test_parse_dtypes():
    assert parse_dtypes("bf16, fp16,bf16") == ["bf16", "fp16"]
    with pytest.raises(ValueError, match="unknown dtype float8"):
        parse_dtypes("bf16,float8")


def test_a_device_map_placed_trainer_scores_as_the_plain_one(tiny_model):
    """accelerate's placement (here a decoder layer offloaded to disk, the rest on
    the CPU: its hooks bring weights in per forward, the sharding code path) changes no number."""
    from mismatch.model.rescore import input_device, load_trainer, rescore

    plain = load_trainer(tiny_model, "fp32", device=torch.device("cpu"))
    placed = load_trainer(
        tiny_model,
        "fp32",
        device_map={
            "model.embed_tokens": "cpu",
            "model.layers.0": "cpu",
            "model.layers.1": "disk",
            "model.norm": "cpu",
            "model.rotary_emb": "cpu",
            "lm_head": "cpu",
        },
    )
    assert placed.hf_device_map["model.layers.1"] == "disk" and input_device(placed) == torch.device("cpu")
    rollouts = [
        Rollout(
            prompt_index=0,
            sample_index=0,
            prompt_ids=[5, 6, 7],
            response_ids=[8, 9, 10, 11],
            logp_engine=[0.0] * 4,
            finish_reason="length",
        ),
        Rollout(
            prompt_index=1,
            sample_index=0,
            prompt_ids=[12, 13],
            response_ids=[14, 15],
            logp_engine=[0.0] * 2,
            finish_reason="length",
        ),
    ]
    a, b = rescore(plain, "fp32", rollouts, 1.0), rescore(placed, "fp32", rollouts, 1.0)
    for x, y in zip(a["logp_trainer"], b["logp_trainer"], strict=True):
        np.testing.assert_array_equal(x, y)
