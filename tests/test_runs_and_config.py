"""The run folder's kind and format version, and configs that check themselves for library callers."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mismatch import runs
from mismatch.cli import app
from mismatch.config import ALGOS, ScanConfig, TrainConfig
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
