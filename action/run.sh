#!/usr/bin/env bash
# The action's run step (action.yml): one mismatch command with the gate, into the run folder.
# Exits with the command's code (1 when a --fail-on condition holds), after recording it as the
# step's output `exit-code` and adding summary.md to the job's summary page.
# Inputs from the environment: MISMATCH_COMMAND (scan | analyze), MISMATCH_MODEL, MISMATCH_DTYPES,
# MISMATCH_GATE (conditions, one per line), MISMATCH_DUMP (analyze: paths, one per line),
# MISMATCH_ARGS (more options, split at spaces), MISMATCH_OUT (the run folder); empty: the default.
set -euo pipefail

refuse() {
  echo "::error::$1"
  echo "exit-code=2" >>"${GITHUB_OUTPUT:-/dev/null}"
  exit 2
}

command=${MISMATCH_COMMAND:-scan}
out=${MISMATCH_OUT:-mismatch-report}
args=("$command")
case $command in
  scan) ;;
  analyze)
    while IFS= read -r path; do
      if [[ -n $path ]]; then
        args+=("$path")
      fi
    done <<<"${MISMATCH_DUMP:-}"
    if ((${#args[@]} == 1)); then
      refuse "command analyze needs the dump: its files or folders in the input dump, one per line"
    fi
    ;;
  *)
    refuse "command must be scan or analyze, not '$command'"
    ;;
esac
if [[ -n ${MISMATCH_MODEL:-} ]]; then
  args+=(--model "$MISMATCH_MODEL")
fi
if [[ -n ${MISMATCH_DTYPES:-} ]]; then
  args+=(--dtypes "$MISMATCH_DTYPES")
fi
while IFS= read -r condition; do
  if [[ -n ${condition//[[:space:]]/} ]]; then
    args+=(--fail-on "$condition")
  fi
done <<<"${MISMATCH_GATE:-}"
read -r -d '' -a extra <<<"${MISMATCH_ARGS:-}" || true # split at spaces and newlines, no globbing
args+=(--out "$out" "${extra[@]}")

echo "mismatch ${args[*]}"
code=0
mismatch "${args[@]}" || code=$?
echo "exit-code=$code" >>"${GITHUB_OUTPUT:-/dev/null}"
if [[ -f $out/summary.md && -n ${GITHUB_STEP_SUMMARY:-} ]]; then
  cat "$out/summary.md" >>"$GITHUB_STEP_SUMMARY"
fi
exit "$code"
