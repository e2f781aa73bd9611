"""``--profile_steps=a:b``: a ``jax.profiler`` trace of steps a … b of every loop of a job.

Each loop (training, Arnoldi, a method's passes, scoring) numbers its steps from 1 and reports
each one to its ``Progress`` (``runtime/progress.py``), which asks ``Window.at`` here: the trace
starts once step a − 1 is reported (at the loop's start for a = 1) and stops once step b is
reported, or when the loop ends. It covers the host's dispatch of steps a … b and what the
devices did meanwhile; a loop resumed past step a − 1 is not traced. Each process writes its own
trace to ``<workdir>/profile/<loop>/process-<i>/`` (TensorBoard's profile plugin or Perfetto
reads it; a ``gs://`` workdir works).
"""

import jax
from absl import logging
from etils import epath

from runtime.errors import InputError

_SETTING: list[tuple[epath.Path, int, int] | None] = [None]  # (directory, a, b) of this process


def configure(workdir: epath.PathLike, spec: str) -> None:
    """Trace steps ``spec`` = "a:b" (1 ≤ a ≤ b) of every loop; "" traces nothing."""
    if not spec:
        _SETTING[0] = None
        return
    first, _, last = spec.partition(":")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        a = b = 0
    if not 1 <= a <= b:
        raise InputError(
            f"--profile_steps={spec!r}: give the first and last step to trace as a:b with "
            "1 <= a <= b, e.g. --profile_steps=5:8"
        )
    _SETTING[0] = (epath.Path(workdir) / "profile", a, b)


class Window:
    """The trace of one loop named ``name``."""

    def __init__(self, name: str) -> None:
        self._name, self._active, self._done = name, False, _SETTING[0] is None
        self.at(0)

    def at(self, step: int) -> None:
        """Step ``step`` of the loop is dispatched (0: the loop starts)."""
        if self._done:
            return
        directory, a, b = _SETTING[0]
        if not self._active and a - 1 <= step < b:
            target = directory / self._name / f"process-{jax.process_index()}"
            target.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(target))
            self._active = True
            logging.info("profiling %s steps %d to %d into %s", self._name, step + 1, b, target)
        elif self._active and step >= b:
            self.close()

    def close(self) -> None:
        if self._active:
            jax.profiler.stop_trace()
            self._active = False
        self._done = True

    def __enter__(self) -> "Window":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
