"""Non-finite values stop a job, with one line naming the stage and the step, before they are saved.

A NaN or Inf in the training loss poisons every later parameter, Krylov vector and score; saved,
it would be resumed from, reused by every later stage, and found only when the metrics come out
NaN. Each loop therefore carries a ``Guard``: on the device, without a host sync per step, it
remembers the first step whose value was not finite; the loop reads it (one scalar) just before
each save, and a non-finite run stops there, leaving the last good checkpoint as it was. The
config itself is checked first, so a ``--config.l2=nan`` never reaches a training step or a
fingerprint comparison.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from runtime import config as config_lib
from runtime.errors import InputError


class NonFiniteError(InputError):
    """A value that must be finite is not; the message names the stage, the step and a fix."""


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every number in the config is finite (a one-line ``NonFiniteError`` otherwise)."""
    for name, value in sorted(config_lib.flat(config).items()):
        if isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteError(
                f"config.{name}={value} is not a finite number; give a finite value"
            )


@jax.jit
def _first_bad(first: jax.Array, step: jax.Array, value: jax.Array) -> jax.Array:
    bad = jnp.logical_not(jnp.all(jnp.isfinite(value)))
    return jnp.where((first < 0) & bad, step, first)


class Guard:
    """The first step at which a watched value was not finite, kept on the device.

    ``update(step, value)`` is one tiny dispatched op (the value stays where it is: a replicated
    loss, a global array of projections); ``check(...)`` reads one scalar, the same on every
    process, so all processes stop together.
    """

    def __init__(self, stage: str, what: str, fix: str):
        self._stage, self._what, self._fix = stage, what, fix
        self._first: Any = None

    def update(self, step: int, value: Any) -> None:
        first = jnp.asarray(-1, jnp.int32) if self._first is None else self._first
        self._first = _first_bad(first, jnp.asarray(step, jnp.int32), value)

    def check(self, kept: str) -> None:
        """Raise if a watched value was not finite; ``kept`` says what was saved before it."""
        if self._first is None:
            return
        first = int(self._first.addressable_data(0))  # replicated: the same on every process
        if first >= 0:
            raise NonFiniteError(
                f"{self._stage} step {first}: {self._what} is NaN or infinite; it was not saved "
                f"({kept}): {self._fix}"
            )
