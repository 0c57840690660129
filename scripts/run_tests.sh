#!/usr/bin/env bash
# Sets up .venv (scripts/setup_env.sh) and runs the whole test suite. Extra args go to pytest (one run with them).
# Without args each test file runs in its own pytest process: XLA's CPU compiler once segfaulted late in a single
# long process (session 10, test_slicing.py, which passes alone), so no file inherits the compiler state of the
# hundreds of programs compiled before it. Fails if any file fails, or if no file runs a test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
VENV=${FLASHKDA_VENV:-.venv}
# Run from tests/ so that the installed package (with its compiled extension) is what gets imported.
cd tests
# pytest's exit status, without stopping the script (5: it collected no tests).
pytest_rc() {
  set +e
  "../$VENV/bin/python" -m pytest -q -rs "$@"
  local rc=$?
  set -e
  return "$rc"
}
if [ "$#" -gt 0 ]; then
  rc=0
  pytest_rc "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests ($*): failing" >&2
    exit 1
  fi
  exit "$rc"
fi
# Per file, "collected nothing" (pytest's 5) is a module skipped as a whole (e.g. torch missing); the run fails
# if no file ran a test.
failed=()
ran=0
for f in test_*.py; do
  echo "== $f"
  rc=0
  pytest_rc "$f" || rc=$?
  if [ "$rc" -eq 0 ]; then
    ran=1
  elif [ "$rc" -ne 5 ]; then
    failed+=("$f")
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
if [ "$ran" -eq 0 ]; then
  echo "pytest ran no tests: failing" >&2
  exit 1
fi
echo "all test files passed"
