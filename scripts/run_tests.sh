#!/usr/bin/env bash
# The project's tests, set up from scratch: create/refresh .venv (scripts/setup_env.sh), then
# ruff check, clang-format (dry run over csrc/) and pytest over tests/ (quiet). Tests marked `gpu` skip themselves without a GPU.
# Extra arguments go to pytest. Both always run; the script exits non-zero if either fails.
# pytest's exit code 5 ("no tests collected", e.g. a -k filter that matches nothing) is success.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup_env.sh
VENV=${DEEPEP_MEGATRON_VENV:-.venv}

echo "run_tests: ruff check"
ruff_status=0
"$VENV/bin/ruff" check . || ruff_status=$?

echo "run_tests: clang-format (csrc/)"
format_status=0
find csrc -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.hpp' -o -name '*.cpp' |
  xargs "$VENV/bin/clang-format" --dry-run --Werror || format_status=$?
[ "$ruff_status" -ne 0 ] || ruff_status=$format_status

echo "run_tests: pytest"
pytest_status=0
"$VENV/bin/python" -m pytest tests -q "$@" || pytest_status=$?
if [ "$pytest_status" -eq 5 ]; then
  echo "run_tests: pytest collected no tests (exit 5); treating as success"
  pytest_status=0
fi

if [ "$ruff_status" -ne 0 ] || [ "$pytest_status" -ne 0 ]; then
  echo "run_tests: FAILED (ruff exit code $ruff_status, pytest exit code $pytest_status)" >&2
  [ "$pytest_status" -ne 0 ] && exit "$pytest_status"
  exit "$ruff_status"
fi
echo "run_tests: passed"
