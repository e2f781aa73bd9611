"""Fault injection for the resilience tests: crash a job at a chosen point, for real.

``INFLUENCE_FAILPOINTS="arnoldi_iteration=7,score_batch=3"`` makes the process SIGKILL itself when
it reaches that point, exactly as a preempted or OOM-killed job dies: no handler runs, an async
checkpoint write may be left half done. Unset (the default), every call is a dictionary lookup.
"""

import os
import signal

ENV = "INFLUENCE_FAILPOINTS"


def _parse(spec: str) -> dict[str, int]:
    points = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        points[name.strip()] = int(value)
    return points


def maybe_fail(name: str, position: int) -> None:
    """SIGKILL this process if failpoint ``name`` is armed at ``position``."""
    spec = os.environ.get(ENV)
    if spec and _parse(spec).get(name) == position:
        os.kill(os.getpid(), signal.SIGKILL)
