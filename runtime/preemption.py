"""Preemption: SIGTERM means "save at the next step boundary and exit ``EXIT_CODE``".

Cloud TPU VMs (and most schedulers) send SIGTERM some seconds before they take a machine away. A job
that checkpoints at the next step boundary loses no work, and re-running the same command resumes
from that checkpoint. It exits ``EXIT_CODE`` (75, sysexits' EX_TEMPFAIL: "try again"), not 0, so a
scheduler can tell "saved, rerun to resume" from "finished" and requeue it
(``launch/gpu_slurm.sbatch``).

- Several processes: every process must save at the *same* step, or the collective save hangs.
  JAX's preemption sync manager (part of ``jax.distributed``) catches SIGTERM in any process,
  tells all of them, and sets the sync point one past the highest step counter any process has
  reported; ``multihost_utils.reached_preemption_sync_point(counter)`` is true there, on every
  process. The counter must therefore only ever increase over the whole process: each stage of
  ``jobs.pipeline`` numbers its own steps from 1, and a notice that arrived after one stage's
  loop (during a compile, a restore, distillation) would otherwise set a sync point the next
  stage's steps never reach. ``reached`` counts every step of every loop of the process
  (``_TICKS``), the same sequence on every process, and Orbax's own preemption check is turned off
  (``checkpoints/checkpointer.py``): it would report its loop's local step numbers.
- One process: that manager does not exist without ``jax.distributed``, so a Python SIGTERM
  handler sets a flag that the next step boundary sees, in whichever stage.

Loops call ``reached(step)`` once per step, and raise ``Preempted`` after saving; the job binary
turns it into ``EXIT_CODE``.
"""

import signal
import threading
import types

import jax
from absl import logging
from jax.experimental import multihost_utils

_SIGTERM = threading.Event()
EXIT_CODE = 75  # preempted, state saved: rerun the same command to resume
_TICKS = [0]  # steps of every loop this process has run, every stage (only ever increases)


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
    """Whether to save at the loop's ``step`` and stop; the same answer on every process (asked
    of the sync manager with the process' step counter, which every call advances)."""
    del step  # the loop's own numbering: the counter is the process'
    _TICKS[0] += 1
    if jax.process_count() > 1:
        return bool(multihost_utils.reached_preemption_sync_point(_TICKS[0]))
    return _SIGTERM.is_set()
