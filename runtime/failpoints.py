"""Fault injection for the resilience tests: crash, preempt or stall a job at a chosen point.

``INFLUENCE_FAILPOINTS="arnoldi_iteration=7,score_batch=3@1,train_step=5:TERM"`` makes a process
act when it reaches that point: SIGKILL by default, exactly as an OOM-killed or lost machine dies
(no handler runs, an async checkpoint write may be left half done); ``:TERM`` sends the
preemption notice instead, then spends ``TERM_SETTLE_SECS`` in host code (see there);
``:STALL`` sleeps ``STALL_SECS`` in host code (a process busy outside any collective, as when it
reads data); ``@1`` arms the point in process 1 only. ``stage=2`` is the point before a job's
second stage (``jobs/cli.py``): ``stage=2:TERM`` is a notice between two stages. A point may be
armed several times (``arnoldi_iteration=5@0:STALL,arnoldi_iteration=5@1``). Unset (the
default), every call is one environment lookup.
"""

import os
import signal
import time

import jax

ENV = "INFLUENCE_FAILPOINTS"
STALL_SECS = 300.0
# After a notice: the host work a real notice lands in (a restore, a compile, a step) takes at
# least this long, and JAX's agreement on the stopping step (a barrier over the coordination
# service, 0.4 s measured here) completes within it. Without it a test's notice at a stage
# boundary could be acted on a few fast steps into the stage, the same step on every process.
TERM_SETTLE_SECS = 1.0
ACTIONS = ("KILL", "TERM", "STALL")


def _parse(spec: str) -> list[tuple[str, int, int | None, str]]:
    points = []
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        value, _, action = value.partition(":")
        position, _, process = value.partition("@")
        action = action or "KILL"
        if action not in ACTIONS:
            raise ValueError(f"{ENV}: unknown action {action!r} in {item!r}; one of {ACTIONS}")
        points.append((name.strip(), int(position), int(process) if process else None, action))
    return points


def maybe_fail(name: str, position: int) -> None:
    """Act if failpoint ``name`` is armed at ``position`` (for this process)."""
    spec = os.environ.get(ENV)
    if not spec or name not in spec:
        return
    for armed_name, armed, process, action in _parse(spec):
        if armed_name != name or armed != position or process not in (None, jax.process_index()):
            continue
        if action == "STALL":
            time.sleep(STALL_SECS)
        elif action == "TERM":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(TERM_SETTLE_SECS)
        else:
            os.kill(os.getpid(), signal.SIGKILL)
