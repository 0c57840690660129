#!/usr/bin/env bash
# Sets up .venv (scripts/setup_env.sh) and runs the whole test suite. Extra args go to pytest (one run with them).
# Without args each test file runs in its own pytest process: XLA's CPU compiler once segfaulted late in a single
# long process (session 10, test_slicing.py, which passes alone), so no file inherits the compiler state of the
# hundreds of programs compiled before it. Fails if any file fails or collects nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
VENV=${FLASHKDA_VENV:-.venv}
# Run from tests/ so that the installed package (with its compiled extension) is what gets imported.
cd tests
run() {
  set +e
  "../$VENV/bin/python" -m pytest -q -rs "$@"
  local rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests ($*): failing" >&2
    return 1
  fi
  return "$rc"
}
if [ "$#" -gt 0 ]; then
  run "$@"
  exit $?
fi
failed=()
for f in test_*.py; do
  echo "== $f"
  run "$f" || failed+=("$f")
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
echo "all test files passed"
