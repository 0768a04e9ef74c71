"""The GitHub composite action (action.yml) run here as a runner runs it: its shell steps in bash with
the inputs and GitHub's variables in the environment, the real `mismatch scan` of the tiny model on the
hf engine, and the GitHub calls through a stand-in `gh` (MISMATCH_GH): an executable that records each
call and keeps the pull request's comments as files. The upload step is GitHub's own action: checked
as declared, not run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mismatch import DISTRIBUTION
from mismatch.verdict.gate import parse_condition

ROOT = Path(__file__).resolve().parents[1]
ACTION = yaml.safe_load((ROOT / "action.yml").read_text())
STEPS = {step["id"]: step for step in ACTION["runs"]["steps"]}
EXPRESSION = re.compile(r"\$\{\{\s*(.+?)\s*\}\}")
MARKER = "<!-- mismatch-report -->"
REPOSITORY = "octo/model"
PULL_REQUEST = "7"
SMALL_SCAN = "--engine hf --num-prompts 2 --max-tokens 8 --semantic-probe 0"

FAKE_GH = r"""#!/usr/bin/env bash
# Stands in for `gh api`: records each call in $FAKE_GH_STATE/calls and keeps the pull request's
# comments as files comment-ID there; with FAKE_GH_FAIL set it answers as a read-only token does.
set -euo pipefail
state=$FAKE_GH_STATE
echo "$*" >>"$state/calls"
if [[ -n ${FAKE_GH_FAIL:-} ]]; then
  echo "HTTP 403: Resource not accessible by integration" >&2
  exit 1
fi
[[ $1 == api ]] || exit 1
shift
method=GET
path=
body=
while (($#)); do
  case $1 in
    --method) method=$2; shift 2 ;;
    -F) body=${2#body=@}; shift 2 ;;
    --jq) shift 2 ;;
    --paginate) shift ;;
    *) path=$1; shift ;;
  esac
done
case "$method $path" in
  "GET repos/octo/model/issues/7/comments")  # what the --jq filter selects: the ids of marked comments
    grep -l -F -- '<!-- mismatch-report -->' "$state"/comment-* 2>/dev/null | sed 's/.*comment-//' || true ;;
  "POST repos/octo/model/issues/7/comments")
    n=1
    while [[ -e $state/comment-$n ]]; do n=$((n + 1)); done
    cp -- "$body" "$state/comment-$n" ;;
  "PATCH repos/octo/model/issues/comments/"*)
    [[ -e $state/comment-${path##*/} ]] || { echo "HTTP 404: Not Found" >&2; exit 1; }
    cp -- "$body" "$state/comment-${path##*/}" ;;
  *) echo "unexpected call: $method $path" >&2; exit 1 ;;
esac
"""


class Runner:
    """A job's workspace: steps of the action run in it one after another, their outputs kept. The pull
    request's comments live in `folder`/comments unless another job's folder is given."""

    def __init__(self, folder: Path, comments: Path | None = None, **inputs: str) -> None:
        self.workspace = folder / "workspace"
        self.workspace.mkdir(parents=True)
        self.gh_state = comments or folder / "comments"
        self.gh_state.mkdir(exist_ok=True)
        gh = folder / "gh-fake"
        gh.write_text(FAKE_GH)
        gh.chmod(0o755)
        self.output = folder / "github_output"
        self.step_summary = folder / "step_summary.md"
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this venv's `mismatch`
            "GITHUB_ACTION_PATH": str(ROOT),
            "GITHUB_REPOSITORY": REPOSITORY,
            "GITHUB_SERVER_URL": "https://github.com",
            "GITHUB_RUN_ID": "42",
            "GITHUB_OUTPUT": str(self.output),
            "GITHUB_STEP_SUMMARY": str(self.step_summary),
            "MISMATCH_GH": str(gh),
            "FAKE_GH_STATE": str(self.gh_state),
        }
        assert set(inputs) <= set(ACTION["inputs"]), "an input the action does not declare"
        self.context = {
            "github.token": "token-of-the-job",
            "github.event.pull_request.number": PULL_REQUEST,
        }
        for name, declared in ACTION["inputs"].items():
            self.context[f"inputs.{name}"] = expand(inputs.get(name, str(declared.get("default", ""))), self.context)

    def step(self, step_id: str) -> subprocess.CompletedProcess[str]:
        """Runs the step as the runner does (`shell: bash`: bash --noprofile --norc -eo pipefail), then
        reads the outputs it wrote into `steps.ID.outputs.NAME`."""
        step = STEPS[step_id]
        assert step["shell"] == "bash"
        script = self.workspace.parent / f"step-{step_id}.sh"
        script.write_text(expand(step["run"], self.context))
        env = {name: expand(str(value), self.context) for name, value in step.get("env", {}).items()}
        self.output.write_text("")
        result = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
            cwd=self.workspace,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        for line in self.output.read_text().splitlines():
            name, value = line.split("=", 1)
            self.context[f"steps.{step_id}.outputs.{name}"] = value
        return result

    def calls(self) -> list[str]:
        calls = self.gh_state / "calls"
        return calls.read_text().splitlines() if calls.exists() else []

    def comments(self) -> dict[str, str]:
        return {path.name.removeprefix("comment-"): path.read_text() for path in self.gh_state.glob("comment-*")}


def expand(text: str, context: dict[str, str]) -> str:
    """`${{ NAME }}` → its value in `context`; an expression the test does not know fails it (teach it here)."""
    return EXPRESSION.sub(lambda found: context[found.group(1)], text)


@pytest.mark.slow
def test_the_gate_fails_the_step_and_one_comment_is_posted_then_updated(tiny_model, tmp_path):
    """Run 1's gate holds (k3 ≥ 0 always does): the run step exits 1 and the comment is still posted,
    beside a reviewer's. Run 2, a later push that stops before it measures (analyze without a dump),
    updates that same comment rather than add one, so the pull request shows no stale numbers."""
    first = Runner(tmp_path / "one", model=str(tiny_model), dtypes="bf16", gate="k3>=0\n", args=SMALL_SCAN, out="run")
    (first.gh_state / "comment-1").write_text("Looks good to me")
    ran = first.step("run")
    assert ran.returncode == 1 and "gate failed: bf16/bf16:k3 = " in ran.stderr, ran.stderr[-2000:]
    assert first.context["steps.run.outputs.exit-code"] == "1"
    summary = (first.workspace / "run" / "summary.md").read_text()
    assert (first.workspace / "run" / "report.html").exists() and "**CI gate:** failed" in summary
    assert first.step_summary.read_text() == summary
    commented = first.step("comment")
    assert commented.returncode == 0 and "posted a comment on pull request 7" in commented.stdout, commented.stderr
    listed, posted = first.calls()
    assert listed.startswith("api --paginate repos/octo/model/issues/7/comments --jq") and MARKER in listed
    assert posted.startswith("api --method POST repos/octo/model/issues/7/comments -F body=@")
    comments = first.comments()
    assert comments["1"] == "Looks good to me" and comments["2"].startswith(f"{MARKER}\n{summary}")
    link = "artifact `mismatch-report` of [this workflow run](https://github.com/octo/model/actions/runs/42)"
    assert link in comments["2"]

    second = Runner(tmp_path / "two", first.gh_state, command="analyze")  # the same pull request
    (second.gh_state / "calls").unlink()
    assert second.step("run").returncode == 2 and second.context["steps.run.outputs.exit-code"] == "2"
    commented = second.step("comment")
    assert commented.returncode == 0 and "updated comment 2" in commented.stdout, commented.stderr
    assert second.calls()[1].startswith("api --method PATCH repos/octo/model/issues/comments/2 -F body=@")
    comments = second.comments()
    assert sorted(comments) == ["1", "2"] and comments["1"] == "Looks good to me"
    assert comments["2"].startswith(f"{MARKER}\n**mismatch** wrote no summary") and summary not in comments["2"]


@pytest.mark.parametrize(
    ("inputs", "error"),
    [
        ({"command": "analyze"}, "command analyze needs the dump"),
        ({"command": "train"}, "command must be scan or analyze, not 'train'"),
    ],
)
def test_a_run_refused_before_it_starts_is_said_on_the_pull_request(tmp_path, inputs, error):
    """No summary.md: the comment says the run stopped and with which code, in place of an earlier run's
    numbers, and the step fails with the reason as a GitHub error annotation."""
    runner = Runner(tmp_path, **inputs)
    ran = runner.step("run")
    assert ran.returncode == 2 and f"::error::{error}" in ran.stdout
    assert runner.step("comment").returncode == 0
    (comment,) = runner.comments().values()
    assert comment.startswith(f"{MARKER}\n**mismatch** wrote no summary: the run stopped with exit code 2")


def test_a_comment_that_cannot_be_posted_is_a_warning_and_outside_a_pull_request_none_is_tried(tmp_path):
    runner = Runner(tmp_path, command="train")
    runner.step("run")
    runner.env["FAKE_GH_FAIL"] = "1"
    commented = runner.step("comment")
    assert commented.returncode == 0 and "::warning::could not read the pull request's comments" in commented.stdout
    assert runner.comments() == {}

    runner.context["github.event.pull_request.number"] = ""  # a push, not a pull request
    runner.env["FAKE_GH_FAIL"] = ""
    before = runner.calls()
    commented = runner.step("comment")
    assert commented.returncode == 0 and "not a pull request" in commented.stdout and runner.calls() == before


def test_the_comment_and_the_artifact_come_after_a_failed_gate_and_every_input_is_used():
    for step_id in ("comment", "upload"):
        assert "!cancelled()" in STEPS[step_id]["if"], f"{step_id} must run when the gate failed the run step"
    upload = STEPS["upload"]
    assert upload["uses"].startswith("actions/upload-artifact@")
    assert "${{ inputs.out }}/report.html" in upload["with"]["path"].splitlines()
    assert ACTION["inputs"]["install"]["default"] == DISTRIBUTION
    used = set(re.findall(r"\$\{\{[^}]*?inputs\.([\w-]+)", yaml.safe_dump(ACTION["runs"])))
    assert used == set(ACTION["inputs"])


def test_the_readme_snippet_uses_the_action_with_inputs_it_has():
    readme = (ROOT / "README.md").read_text()
    (snippet,) = [block for block in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if "/mismatch@" in block]
    workflow = yaml.safe_load(snippet)
    assert workflow["permissions"]["pull-requests"] == "write"  # the comment
    (job,) = workflow["jobs"].values()
    (step,) = [step for step in job["steps"] if "/mismatch@" in step.get("uses", "")]
    assert set(step["with"]) <= set(ACTION["inputs"])
    for line in step["with"].get("gate", "").splitlines():
        parse_condition(line)
    assert DISTRIBUTION in step["with"].get("install", DISTRIBUTION)
