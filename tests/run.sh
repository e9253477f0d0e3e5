#!/usr/bin/env bash
# Runs the whole suite with the project's venv. pytest's exit code 5 ("no tests collected")
# is a failure here, never a silent pass.
set -u
cd "$(dirname "$0")/.." || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "tests/run.sh: pytest collected no tests (exit 5) - failing" >&2
  exit 1
fi
exit "$rc"
