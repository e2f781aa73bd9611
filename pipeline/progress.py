"""Progress of long loops: rate and ETA in the log, scalars in TensorBoard, process 0 only.

Wraps clu's ReportProgress (steps/s, ETA) and metric writer; other processes get a writer that
only logs, so every process can call the same code.
"""

import time
from typing import Any

import jax
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath


class Progress:
    """One per loop: ``progress(step, **scalars)`` after each step; ``close()`` at the end (or use
    it as a context manager, which closes it on every exit path).

    Scalars may be device arrays: they are read (which waits for the device) only when a line is
    due, every ``every_secs``, so a hot loop that reports every step does not sync every step.
    """

    def __init__(self, workdir: epath.PathLike, name: str, total_steps: int, every_secs: float):
        self.name = name
        self._writer = metric_writers.create_default_writer(
            str(epath.Path(workdir) / "tensorboard" / name),
            just_logging=jax.process_index() > 0,
            asynchronous=False,
        )
        self._report = periodic_actions.ReportProgress(
            num_train_steps=total_steps, writer=self._writer, every_secs=every_secs
        )
        self._every_secs = every_secs
        self._last_log = 0.0
        self._total = total_steps

    def __call__(self, step: int, **scalars: Any) -> None:
        self._report(step)
        now = time.monotonic()
        if scalars and (now - self._last_log >= self._every_secs or step == self._total):
            self._last_log = now
            self._writer.write_scalars(step, {f"{self.name}/{k}": v for k, v in scalars.items()})
            if jax.process_index() == 0:
                shown = ", ".join(f"{k}={float(v):.4g}" for k, v in scalars.items())
                logging.info("%s step %d/%d: %s", self.name, step, self._total, shown)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
