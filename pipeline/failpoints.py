"""Fault injection for the resilience tests: crash a job at a chosen point, for real.

``INFLUENCE_FAILPOINTS="arnoldi_iteration=7,score_batch=3@1"`` makes a process SIGKILL itself when
it reaches that point (``@1``: only process 1), exactly as a preempted or OOM-killed job dies: no
handler runs, an async checkpoint write may be left half done. Unset (the default), every call is
a dictionary lookup.
"""

import os
import signal

import jax

ENV = "INFLUENCE_FAILPOINTS"


def _parse(spec: str) -> dict[str, tuple[int, int | None]]:
    points = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        position, _, process = value.partition("@")
        points[name.strip()] = (int(position), int(process) if process else None)
    return points


def maybe_fail(name: str, position: int) -> None:
    """SIGKILL this process if failpoint ``name`` is armed at ``position`` (for this process)."""
    spec = os.environ.get(ENV)
    if not spec or name not in (points := _parse(spec)):
        return
    armed, process = points[name]
    if armed == position and process in (None, jax.process_index()):
        os.kill(os.getpid(), signal.SIGKILL)
