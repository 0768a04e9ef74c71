#!/usr/bin/env bash
# The action's comment step (action.yml): summary.md of the run folder as ONE comment on the pull
# request. The comment an earlier run posted is found by its hidden marker and updated, so a pull
# request keeps one mismatch comment however often it is pushed. A run that wrote no summary.md
# (a usage error) updates it to say so, rather than leave an earlier run's numbers standing.
# Environment: MISMATCH_OUT (the run folder), PR_NUMBER (empty: not a pull request, nothing posted),
# GITHUB_REPOSITORY, MISMATCH_EXIT (the run's exit code), MISMATCH_ARTIFACT (where report.html is
# kept), GITHUB_SERVER_URL and GITHUB_RUN_ID (the link to it), MISMATCH_GH (the GitHub CLI: gh).
# A comment that cannot be posted (a pull request from a fork gets a read-only token) is a warning:
# the gate alone decides whether the job fails.
set -euo pipefail

marker='<!-- mismatch-report -->'
gh=${MISMATCH_GH:-gh}
out=${MISMATCH_OUT:-mismatch-report}
if [[ -z ${PR_NUMBER:-} ]]; then
  echo "not a pull request: no comment posted"
  exit 0
fi
comments="repos/${GITHUB_REPOSITORY:?}/issues/$PR_NUMBER/comments"

body=$(mktemp)
trap 'rm -f "$body"' EXIT
{
  echo "$marker"
  if [[ -f $out/summary.md ]]; then
    cat "$out/summary.md"
  else
    echo "**mismatch** wrote no summary: the run stopped with exit code ${MISMATCH_EXIT:-unknown} before its report (see the job's log)."
  fi
  if [[ -n ${GITHUB_RUN_ID:-} ]]; then
    echo
    echo "report.html: artifact \`${MISMATCH_ARTIFACT:-mismatch-report}\` of [this workflow run](${GITHUB_SERVER_URL:-https://github.com}/$GITHUB_REPOSITORY/actions/runs/$GITHUB_RUN_ID)."
  fi
} >"$body"

if ! ids=$("$gh" api --paginate "$comments" --jq ".[] | select(.body | contains(\"$marker\")) | .id"); then
  echo "::warning::could not read the pull request's comments; no comment posted"
  exit 0
fi
id=$(head -n 1 <<<"$ids")
if [[ -n $id ]]; then
  if "$gh" api --method PATCH "repos/$GITHUB_REPOSITORY/issues/comments/$id" -F "body=@$body" >/dev/null; then
    echo "updated comment $id"
  else
    echo "::warning::could not update comment $id"
  fi
elif "$gh" api --method POST "$comments" -F "body=@$body" >/dev/null; then
  echo "posted a comment on pull request $PR_NUMBER"
else
  echo "::warning::could not post the comment (a pull request from a fork has a read-only token)"
fi
