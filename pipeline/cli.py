"""What every job binary does: flags, platform set-up, and one-line errors for bad input.

A job is ``cli.main([stage, ...])``; each stage is ``run(config, workdir)``. Bad input (an unknown
config field, an impossible value, a missing or incompatible checkpoint) ends the process with one
line on stderr, ``error: ...``, and exit code 2, before any expensive work.
"""

import logging as logging_std
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax
import ml_collections
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from pipeline.errors import USER_ERRORS

Stage = Callable[[ml_collections.ConfigDict, epath.PathLike], Any]

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file[:presets], e.g. configs/mnist.py:model=flax_cnn."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory (local or gs://) for all state and outputs."
)


def _fail(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def _last_line(e: BaseException) -> str:
    """The informative line of a config_flags error (it embeds tracebacks and escaped newlines)."""
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if any(ln.startswith("Traceback") for ln in lines):
        lines = [lines[0].split("Error whilst")[0] + lines[-1]]
    line = " ".join(lines)
    return line[1:-1] if len(line) > 1 and line[0] == line[-1] == "'" else line


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but an unknown or ill-typed --config.* override is one line, not a traceback
    (config_flags raises AttributeError/KeyError/TypeError for those)."""
    try:
        rest = flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        _fail(f"unknown config field: {_last_line(e)}")
    except Exception as e:  # every parse failure is a user error
        _fail(f"bad command line: {_last_line(e)}")
    for name in ("config", "workdir"):
        if flags.FLAGS[name].value is None:
            _fail(f"--{name} is required")
    return rest


class _QuietLibraries(logging_std.Filter):
    """Drop INFO chatter of Orbax (dozens of lines per save); its warnings and errors still show."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno > logging_std.INFO or "/orbax/" not in record.pathname


def run_stages(stages: Sequence[Stage], config: ml_collections.ConfigDict, workdir: str) -> None:
    """Run ``stages`` in order; user errors exit 2 with one line. Process 0 alone logs at INFO."""
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if jax.process_index() > 0:
        logging.set_verbosity(logging.WARNING)
    logging.info(
        "JAX %s, %d processes, devices: %s", jax.__version__, jax.process_count(), jax.devices()
    )
    logging.info("config:\n%s", config)
    try:
        for stage in stages:
            stage(config, workdir)
    except USER_ERRORS as e:
        _fail(str(e))


def main(stages: Sequence[Stage]) -> None:
    """The body of every ``jobs/*.py``: parse flags, then run the stages."""

    def _main(argv: list[str]) -> None:
        if len(argv) > 1:
            _fail(f"unexpected arguments: {argv[1:]}")
        run_stages(stages, _CONFIG.value, _WORKDIR.value)

    app.run(_main, flags_parser=_parse_flags)
