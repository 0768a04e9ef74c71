"""Faults, each with a test: two runs aimed at one folder, a lock its dead holder left, SIGTERM, the
engine's process killed mid-generation, a disk that fills while a file is written, and `--force`
into an earlier run's folder. Each fails on the main before these faults were handled, except where
its docstring says what main already did."""

import fcntl
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from mismatch import runs
from mismatch.cli import app
from mismatch.errors import OutputExists

runner = CliRunner()
MISMATCH = Path(sys.executable).with_name("mismatch")  # the installed command, run as a user runs it
TINY_SCAN = ("--engine", "hf", "--dtypes", "bf16", "--num-prompts", "2", "--max-tokens", "4", "--semantic-probe", "0")

# A second process that holds a folder as a scan would, until the test closes its stdin.
HOLD = """
import sys
from pathlib import Path
from mismatch import runs
folder = Path(sys.argv[1])
sys.argv = ["mismatch", "scan", "--out", str(folder)]
with runs.claim(folder, keep=True):
    print("held", flush=True)
    sys.stdin.read()
"""
# A process that dies holding the folder: its lock file stays behind.
DIE_HOLDING = """
import os, signal, sys
from pathlib import Path
from mismatch import runs
with runs.claim(Path(sys.argv[1]), keep=True):
    os.kill(os.getpid(), signal.SIGKILL)
"""


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result, code=2) -> str:
    """The one line a refused command printed."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0].removeprefix("error: ")


def earlier_run(folder: Path, kind: str = "scan", files: tuple[str, ...] = ()) -> Path:
    """A run folder as an earlier run of `kind` left it: its summary.json and `files` (names; a/b makes a folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    runs.write_json(folder / runs.SUMMARY, {"format_version": runs.FORMAT_VERSION, "kind": kind, "complete": True})
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"{name} of the earlier run")
    return folder


def contents(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- one run per folder -----------------------------------------------------------------------


def test_a_second_process_aimed_at_a_folder_in_use_is_refused_naming_the_first(tiny_model, tmp_path):
    """scan (plain, --force, --resume), diagnose, analyze and train into a folder another process holds: one
    line naming that process (pid, host, command, since when), exit 2, the folder untouched; free once it ends."""
    out = earlier_run(tmp_path / "run", "scan", (runs.TOKENS, runs.ROLLOUTS))
    dump = tmp_path / "dump.jsonl"
    dump.write_text("{}\n")
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout is not None and first.stdout.readline() == "held\n"
        before = contents(out)  # the earlier run and the first process's lock file
        model = ("--model", tiny_model)
        for command in (
            ("scan", *model, *TINY_SCAN, "--out", out),
            ("scan", *model, *TINY_SCAN, "--out", out, "--force"),
            ("scan", *model, *TINY_SCAN, "--out", out, "--resume"),
            ("diagnose", *model, "--out", out, "--force"),
            ("analyze", dump, "--out", out, "--force"),
            ("train", *model, "--engine", "hf", "--out", out, "--force"),
        ):
            line = error_line(cli(*command))
            assert re.fullmatch(
                rf"{re.escape(str(out))} is in use by another mismatch run \(pid {first.pid} on"
                rf" {re.escape(socket.gethostname())} since \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00: mismatch scan"
                rf" --out {re.escape(str(out))}\); wait for it to end or choose another --out",
                line,
            ), (command[0], line)
            assert contents(out) == before
    finally:
        first.communicate(timeout=60)
    assert first.returncode == 0
    assert not (out / runs.LOCK).exists()
    with runs.claim(out, keep=True):  # the first let go: the folder is free
        assert json.loads((out / runs.LOCK).read_text())["pid"] == os.getpid()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", DIE_HOLDING, str(folder)])
    assert dead.wait(timeout=120) == -signal.SIGKILL
    assert json.loads((folder / runs.LOCK).read_text())["pid"] == dead.pid  # what it left
    with runs.claim(folder, keep=True):
        assert json.loads((folder / runs.LOCK).read_text())["pid"] == os.getpid()
    assert not (folder / runs.LOCK).exists()


def test_the_folder_is_let_go_on_an_interrupt_and_a_folder_made_for_nothing_is_removed(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), runs.claim(out):
        lock = os.open(out / runs.LOCK, os.O_RDONLY)  # the file the claim holds, opened apart
        with pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        raise KeyboardInterrupt
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # let go: another holder gets it at once
    os.close(lock)
    assert not out.exists()  # created for the run, which wrote nothing


# --- SIGTERM, the engine's death, a full disk -------------------------------------------------


@pytest.mark.slow
def test_sigterm_stops_a_scan_as_ctrl_c_does_and_resume_completes_it(tiny_model, tmp_path):
    """A real `mismatch scan` gets SIGTERM (a cluster's pre-emption) once its first dtype is generated: Ctrl-C's
    line, exit code 143 (128 + SIGTERM, as a shell or a scheduler reports a SIGTERM end), the folder marked
    incomplete and let go, and --resume completes it from the saved engine outputs."""
    out = tmp_path / "run"
    args = ("scan", "--model", tiny_model, "--engine", "hf", "--dtypes", "bf16,fp16", "--num-prompts", 4)
    args += ("--max-tokens", 16, "--semantic-probe", 0, "--out", out)
    with (tmp_path / "stderr.txt").open("w") as log:  # a file, not a pipe: nothing blocks the scan's output
        scan = subprocess.Popen([MISMATCH, *map(str, args)], stdout=subprocess.DEVNULL, stderr=log)
    started = time.monotonic()
    while not ((out / runs.SUMMARY).is_file() and "generate_bf16" in runs_finished(out)):
        if scan.poll() is not None or time.monotonic() - started > 300:
            scan.kill()
            pytest.fail(f"the scan ended or hung before its first dtype was generated: {scan.wait()}")
        time.sleep(0.02)
    scan.send_signal(signal.SIGTERM)
    scan.wait(timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert scan.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted: {out} is marked incomplete; continue with the same command and --resume --out {out}"
    )
    summary = json.loads((out / runs.SUMMARY).read_text())
    assert summary["complete"] is False and "metrics" not in summary["finished"]
    assert not (out / runs.LOCK).exists()

    result = cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / runs.SUMMARY).read_text())
    assert summary["complete"] is True and "generate_bf16 (resumed)" in summary["finished"]


def runs_finished(out: Path) -> list[str]:
    return json.loads((out / runs.SUMMARY).read_text())["finished"]


def test_sigterm_ends_any_command_in_one_line_with_exit_code_143(tmp_path, monkeypatch):
    """SIGTERM arrives while `report` works (sent to this process): one line, 143, and the handler this process had
    before the command is back afterwards."""
    import mismatch.report

    def not_handled(signum, frame):  # instead of ending the test process, as SIGTERM's default would
        raise AssertionError("the command let SIGTERM through")

    monkeypatch.setattr(mismatch.report, "write_report", lambda run_dir: os.kill(os.getpid(), signal.SIGTERM))
    previous = signal.signal(signal.SIGTERM, not_handled)
    try:
        result = cli("report", tmp_path)
        assert signal.getsignal(signal.SIGTERM) is not_handled
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 143, result.output
    assert result.output.strip() == "interrupted: nothing is left looking complete; run the command again"


@pytest.mark.engine
@pytest.mark.slow
def test_the_engine_process_killed_mid_generation_is_one_line_and_the_scan_resumes(tiny_model, tmp_path, monkeypatch):
    """vLLM's process is SIGKILLed (as the out-of-memory killer does) while it generates the second dtype. Main
    already ended such a run in one line ("ended unexpectedly (exit code -9)") and left it incomplete and
    resumable; this pins that, with the line now naming the signal and the --resume that continues it."""
    from mismatch.engines import isolated

    out = tmp_path / "run"
    args = ("scan", "--model", tiny_model, "--engine", "vllm", "--dtypes", "bf16,fp16", "--num-prompts", 2)
    args += ("--max-tokens", 8, "--semantic-probe", 0, "--out", out)
    call = isolated._Child.call
    generates = []

    def kill_in_second_generate(self, command, *rest, **options):
        if command == "generate":
            generates.append(command)
            if len(generates) == 2:  # the request is sent, then the process is killed

                def receive(receive=self._receive):
                    os.kill(self._process.pid, signal.SIGKILL)
                    return receive()

                monkeypatch.setattr(self, "_receive", receive)
        return call(self, command, *rest, **options)

    monkeypatch.setattr(isolated._Child, "call", kill_in_second_generate)
    line = error_line(cli(*args))
    monkeypatch.undo()
    assert line == (
        "the vllm engine process was killed by SIGKILL (as the kernel's out-of-memory killer does);"
        f" {out} is marked incomplete: continue with the same command and --resume --out {out}"
    )
    summary = json.loads((out / runs.SUMMARY).read_text())
    assert summary["complete"] is False and "generate_bf16" in summary["finished"]
    assert "generate_fp16" not in summary["finished"]
    assert pd.read_parquet(out / runs.ROLLOUTS)["engine_dtype"].unique().tolist() == ["bf16"]

    result = cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / runs.SUMMARY).read_text())
    assert summary["complete"] is True
    assert "generate_bf16 (resumed)" in summary["finished"] and "generate_fp16" in summary["finished"]


# A process under a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored: a write past it fails with EFBIG, as
# a full disk fails one with ENOSPC) rewrites a parquet file, then streams one.
WRITE_PAST_LIMIT = """
import resource, signal, sys
from pathlib import Path
import pandas as pd
from mismatch import runs
from mismatch.errors import DiskFull
folder = Path(sys.argv[1])
runs.write_parquet(folder / "small.parquet", pd.DataFrame({"x": [1.0, 2.0]}))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))
big = pd.DataFrame({"x": range(100_000)}).astype(float)
try:
    runs.write_parquet(folder / "small.parquet", big)
except DiskFull as exc:
    print(exc)
try:
    with runs.parquet_sink(folder / "streamed.parquet", ("x",)) as write:
        write(big)
except DiskFull as exc:
    print(exc)
"""


def test_a_file_size_limit_fails_a_write_in_one_line_and_keeps_the_previous_file_whole(tmp_path):
    written = subprocess.run(
        [sys.executable, "-c", WRITE_PAST_LIMIT, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert written.returncode == 0, written.stderr
    advice = "no half-written file is kept: free space, then run the command again (a scan continues with --resume)"
    assert written.stdout.splitlines() == [
        f"cannot write {tmp_path / name}: File too large (EFBIG); {advice}"
        for name in ("small.parquet", "streamed.parquet")
    ]
    assert pd.read_parquet(tmp_path / "small.parquet")["x"].tolist() == [1.0, 2.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.parquet"]  # no temporary file left


def limit_file_size(limit: int):
    def limit_it():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # kept across exec: a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return limit_it


@pytest.mark.slow
def test_a_scan_that_runs_out_of_space_says_so_in_one_line_and_resumes(tiny_model, tmp_path):
    """A real `mismatch scan` whose files may not pass 16 KiB (summary.json and rollouts.parquet, 3 and 12 KB, fit;
    tokens.parquet, 23 KB, does not): one line naming the file, errno and what to do, exit 2; summary.json
    still says incomplete, nothing under a final name is half-written; with space again --resume completes it."""
    out = tmp_path / "run"
    args = ("scan", "--model", tiny_model, "--engine", "hf", "--dtypes", "bf16", "--num-prompts", 8)
    args += ("--max-tokens", 32, "--semantic-probe", 0, "--out", out)
    full = subprocess.run(
        [MISMATCH, *map(str, args)], capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size(16 << 10)
    )
    assert full.returncode == 2, full.stderr
    assert "Traceback" not in full.stderr
    assert full.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {out / runs.TOKENS}: File too large (EFBIG); no half-written file is kept: free space,"
        " then run the command again (a scan continues with --resume)"
    )
    summary = json.loads((out / runs.SUMMARY).read_text())
    assert summary["complete"] is False and "generate_bf16" in summary["finished"]
    assert sorted(p.name for p in out.iterdir()) == [runs.ROLLOUTS, runs.SUMMARY]
    assert len(pd.read_parquet(out / runs.ROLLOUTS)) == 8

    result = cli(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((out / runs.SUMMARY).read_text())["complete"] is True


# --- --force ----------------------------------------------------------------------------------

LORA_SCAN = (
    runs.TOKENS,
    runs.ROLLOUTS,
    runs.MERGED_TOKENS,
    runs.MERGED_ROLLOUTS,
    runs.ROUTING,
    runs.METRICS_CSV,
    runs.REPORT_HTML,
    runs.SUMMARY_MD,
    f".{runs.TOKENS}.k3x9a0b1.tmp",  # a temporary file a killed run left
    ".merged-model-4kq2/config.json",
)


def test_force_replaces_an_earlier_lora_scan_and_nothing_of_it_stays(tiny_model, tmp_path):
    out = earlier_run(tmp_path / "run", "scan", LORA_SCAN)
    result = cli("scan", "--model", tiny_model, *TINY_SCAN, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [runs.SUMMARY, runs.TOKENS, runs.ROLLOUTS, runs.METRICS_CSV, runs.REPORT_HTML, runs.SUMMARY_MD]
    )
    summary = json.loads((out / runs.SUMMARY).read_text())
    assert summary["complete"] is True and "lora" not in summary
    assert pd.read_parquet(out / runs.TOKENS)["engine_dtype"].unique().tolist() == ["bf16"]


def test_force_refuses_a_folder_that_also_holds_a_file_no_run_wrote(tiny_model, tmp_path):
    out = earlier_run(tmp_path / "run", "scan", (*LORA_SCAN, "notes.txt"))
    before = contents(out)
    line = error_line(cli("scan", "--model", tiny_model, *TINY_SCAN, "--out", out, "--force"))
    assert line == (
        f"--force replaces an earlier mismatch run, and {out} also holds notes.txt, which no run wrote: move it away or"
        " choose another --out"
    )
    assert contents(out) == before  # nothing deleted


def test_force_clears_a_train_compare_root_with_its_runs_inside_and_nothing_of_a_user(tmp_path):
    root = tmp_path / "train"
    for dtype in ("bf16", "fp16"):
        run = (runs.METRICS_CSV, runs.STEP_METRICS, runs.TOKENS, runs.STEP0_PROMPTS, runs.IMPACT)
        earlier_run(root / dtype, "train", (*run, "checkpoint-final/model.safetensors", ".live-adapter/a.bin"))
        earlier_run(root / dtype / runs.STEP0_SCAN, "scan", (runs.TOKENS, runs.LOCK))
    (root / runs.REPORT_HTML).write_text("the earlier report")
    (root / runs.VALIDATION).write_text("{}")
    (root / "fp16" / "checkpoint-final" / "mine.txt").write_text("a checkpoint is the run's, whole")
    (root / "bf16" / "notes.txt").write_text("mine")
    (root / "seed-3").mkdir()  # named as a run folder, holds none: not the run's
    before = contents(root)
    with pytest.raises(OutputExists, match=r"also holds bf16/notes.txt and 1 more, which no run wrote"):
        with runs.claim(root, force=True):
            pass
    assert contents(root) == before
    (root / "bf16" / "notes.txt").unlink()
    (root / "seed-3").rmdir()
    with runs.claim(root, force=True):
        assert os.listdir(root) == [runs.LOCK]
    assert os.listdir(root) == []


def test_force_refuses_a_folder_that_holds_no_run_and_a_file_given_as_the_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / runs.REPORT_HTML).write_text("a report of my own")
    with pytest.raises(OutputExists, match="holds none"):
        with runs.claim(folder, force=True):
            pass
    assert (folder / runs.REPORT_HTML).read_text() == "a report of my own"
    with pytest.raises(OutputExists, match="is a file"):
        with runs.claim(folder / runs.REPORT_HTML, force=True):
            pass
