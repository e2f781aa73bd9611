#!/usr/bin/env bash
# Set up .venv (pinned deps, editable install with the test extra) and run lint + the test suite.
#   bash launch/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup_venv.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
