"""Preemption: SIGTERM means "save at the next step boundary and exit 0".

Cloud TPU VMs (and most schedulers) send SIGTERM some seconds before they take a machine away. A job
that checkpoints at the next step boundary and exits 0 loses no work, and re-running the same
command resumes from that checkpoint.

- Several processes: every process must save at the *same* step, or the collective save hangs.
  JAX's preemption sync manager (part of ``jax.distributed``) catches SIGTERM in any process,
  tells all of them, and agrees on the first step every process can still reach;
  ``multihost_utils.reached_preemption_sync_point(step)`` is true there, on every process.
  Orbax's CheckpointManager uses the same manager with the same step numbers.
- One process: that manager does not exist without ``jax.distributed``, so a Python SIGTERM
  handler sets a flag that the next step boundary sees.

Loops call ``reached(step)`` once per step with consecutive step numbers, the same on every
process, and raise ``Preempted`` after saving; the job binary turns it into exit code 0.
"""

import signal
import threading
import types

import jax
from absl import logging
from jax.experimental import multihost_utils

_SIGTERM = threading.Event()


class Preempted(Exception):  # noqa: N818 - a request to stop, not an error
    """Raised by a loop after its state at the current step is saved."""


def _on_sigterm(signum: int, frame: types.FrameType | None) -> None:
    del signum, frame
    if not _SIGTERM.is_set():
        logging.warning("SIGTERM: saving at the next step boundary, then exiting")
    _SIGTERM.set()


def install_handler() -> None:
    """Single-process jobs: catch SIGTERM (multi-process jobs leave it to jax.distributed)."""
    if jax.process_count() == 1:
        signal.signal(signal.SIGTERM, _on_sigterm)


def reached(step: int) -> bool:
    """Whether to save at ``step`` and stop; the same answer on every process."""
    if jax.process_count() > 1:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    return _SIGTERM.is_set()
