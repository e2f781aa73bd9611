"""Progress of long loops: rate and ETA in the log, scalars in TensorBoard, process 0 only.

Every process calls the same code; only process 0 logs and writes
``<workdir>/tensorboard/<loop>/events.out.tfevents.*`` (``runtime/tensorboard.py``).
"""

import time
from typing import Any

import jax
from absl import logging
from etils import epath

from runtime import profile
from runtime.tensorboard import ScalarWriter


class Progress:
    """One per loop: ``progress(step, **scalars)`` after each step; ``close()`` at the end (or use
    it as a context manager, which closes it on every exit path).

    A line (steps/s and ETA since the first report, then the scalars) and a TensorBoard point are
    due every ``every_secs`` and at the last step. Scalars may be device arrays: they are read
    (which waits for the device) only when a line is due, so a hot loop that reports every step
    does not sync every step.
    """

    def __init__(self, workdir: epath.PathLike, name: str, total_steps: int, every_secs: float):
        self.name = name
        self._total, self._every_secs = total_steps, every_secs
        self._leader = jax.process_index() == 0
        self._writer = (
            ScalarWriter(epath.Path(workdir) / "tensorboard" / name) if self._leader else None
        )
        self._first: tuple[float, int] | None = None  # (time, step) of the first report
        self._last_log = 0.0
        self._trace = profile.Window(name)  # --profile_steps

    def __call__(self, step: int, **scalars: Any) -> None:
        self._trace.at(step)
        now = time.monotonic()
        if self._first is None:
            self._first = (now, step)
        if not self._leader or (now - self._last_log < self._every_secs and step < self._total):
            return
        self._last_log = now
        elapsed, done = now - self._first[0], step - self._first[1]
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        values = {k: float(v) for k, v in scalars.items()}
        shown = "".join(f", {k}={v:.4g}" for k, v in values.items())
        speed = (
            f"{rate:.3g} steps/s, ETA {(self._total - step) / rate:.0f} s" if rate else "starting"
        )
        logging.info("%s step %d/%d (%s)%s", self.name, step, self._total, speed, shown)
        scalars = {f"{self.name}/{k}": v for k, v in values.items()}
        if rate:
            scalars[f"{self.name}/steps_per_sec"] = rate
        self._writer.write_scalars(step, scalars)

    def close(self) -> None:
        self._trace.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
