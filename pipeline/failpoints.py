"""Fault injection for the resilience tests: crash or preempt a job at a chosen point, for real.

``INFLUENCE_FAILPOINTS="arnoldi_iteration=7,score_batch=3@1,train_step=5:TERM"`` makes a process
signal itself when it reaches that point: SIGKILL by default, exactly as an OOM-killed or lost
machine dies (no handler runs, an async checkpoint write may be left half done); ``:TERM`` sends
the preemption notice instead; ``@1`` arms the point in process 1 only. Unset (the default), every
call is one environment lookup.
"""

import os
import signal

import jax

ENV = "INFLUENCE_FAILPOINTS"


def _parse(spec: str) -> dict[str, tuple[int, int | None, signal.Signals]]:
    points = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        value, _, signame = value.partition(":")
        position, _, process = value.partition("@")
        points[name.strip()] = (
            int(position),
            int(process) if process else None,
            signal.Signals[f"SIG{signame or 'KILL'}"],
        )
    return points


def maybe_fail(name: str, position: int) -> None:
    """Signal this process if failpoint ``name`` is armed at ``position`` (for this process)."""
    spec = os.environ.get(ENV)
    if not spec or name not in (points := _parse(spec)):
        return
    armed, process, signum = points[name]
    if armed == position and process in (None, jax.process_index()):
        os.kill(os.getpid(), signum)
