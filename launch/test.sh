#!/usr/bin/env bash
# Set up .venv (pinned deps, editable install with the test extra) and run lint + the test suite.
#   bash launch/test.sh [--fast] [pytest args...]
# --fast: the inner loop (tests not marked slow: the math, configs, checks and bad input; no job
# run end to end), a few minutes; without it, the whole suite (docs/testing.md has both times).
set -euo pipefail
cd "$(dirname "$0")/.."
tier=()
if [ "${1:-}" = "--fast" ]; then
  tier=(-m "not slow")
  shift
fi
source launch/setup_venv.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two workers (PYTEST_WORKERS), each test file on one of them (module fixtures are built once),
# the longest files first (tests/conftest.py: LONGEST_FIRST; --no-loadscope-reorder keeps that
# order instead of xdist's by test count).
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder \
  "${tier[@]}" "$@"
