"""A small typed wrapper around ``orbax.checkpoint.CheckpointManager``.

Every checkpoint of this project is a pair: ``state`` (a pytree of arrays, saved with
StandardSave, restorable onto any mesh through target shardings) and ``meta`` (a JSON dict: the
config fingerprint, counters, anything a later job must check before it trusts the state).
Callers say save / restore; they never see Orbax args.

Resuming reads the newest *readable* step (``restore_latest``). A step killed during an
asynchronous save never became a step (Orbax writes into a temporary directory and renames it at
the end). A step that exists but cannot be read (a truncated file, a disk error) is moved aside
to ``<step>.unreadable-<time>`` with a warning and the previous step is used; when no step can be
read the job stops with an error instead of starting over from zero.

Several managers may save at once (training's asynchronous state save still finishing in its
thread while the params after an epoch are kept): Orbax's managers synchronise every save through
barriers whose names are the same for every manager unless ``barrier_sync_key_prefix`` differs,
and two processes of a job then fail with "Barrier ... is already ongoing". Each Checkpointer's
prefix is its directory's last components (``_barrier_prefix``), the same on every process.
"""

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from influence.errors import UserError
from runtime.errors import first_line

STATE = "state"
META = "meta"


def _barrier_prefix(directory: epath.Path) -> str:
    """Orbax's barrier-name prefix for a manager of ``directory``: distinct between the
    directories one job saves to at once, equal on every process. The last three components, not
    the whole path: a relative workdir made absolute may differ between hosts' working
    directories."""
    return "_".join(directory.parts[-3:]).replace("/", "_")


class CheckpointError(UserError):
    """A saved state the job cannot use; the message says how to fix it."""


class IncompatibleCheckpointError(CheckpointError):
    """A saved state computed from another config (its fingerprint differs)."""


class UnreadableCheckpointError(CheckpointError):
    """Steps exist but none of them can be read."""


@dataclasses.dataclass
class Checkpointer:
    """Orbax options with the defaults this project relies on.

    Attributes:
      directory: where steps live (local path, relative ones made absolute, or gs://); created
        when the Checkpointer is.
      max_to_keep: completed steps kept; 2 so that a corrupted latest step has a fallback.
      save_interval_steps: ``save`` writes steps that are multiples of this, the step every
        process agreed on after a preemption notice, and any step with ``force``; nothing else
        (Orbax's default would also write the first step saved, a full extra write of a large
        Krylov basis that is still almost all zeros).
      async_save: write in a background thread; arrays are copied to host before ``save`` returns,
        so the caller may donate or overwrite them at once.
    """

    directory: epath.PathLike
    max_to_keep: int | None = 2
    save_interval_steps: int = 1
    async_save: bool = True

    def __post_init__(self) -> None:
        # Orbax's tensorstore backend refuses relative paths ("--workdir=workdirs/mnist").
        self.directory = epath.Path(self.directory)
        if not self.directory.is_absolute():
            self.directory = self.directory.absolute()
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.max_to_keep,
            # Preemption saves are the stages' own (``force``), at the process' counter.
            save_decision_policy=policies.FixedIntervalPolicy(self.save_interval_steps),
            enable_async_checkpointing=self.async_save,
            create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=_barrier_prefix(self.directory)
            ),
        )
        self._manager = _Manager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], force: bool = False) -> bool:
        args = ocp.args.Composite(
            **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
        )
        return self._manager.save(step, args=args, force=force)

    def restore_meta(self, step: int) -> dict[str, Any]:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()})
        )
        return dict(restored[META])

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """State restored onto the shardings of ``abstract_state`` (ShapeDtypeStructs), and meta."""
        args = ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
        )
        restored = self._manager.restore(step, args=args)
        return restored[STATE], dict(restored[META])

    def restore_latest(
        self,
        abstract_state: Any | None,
        check_meta: Callable[[dict[str, Any]], None] = lambda meta: None,
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, meta) of the newest readable step, or None when there is no step.

        ``check_meta(meta)`` runs first and may raise (a config mismatch is not corruption: it
        propagates and nothing is moved). With ``abstract_state`` None only meta is read. Every
        process must call this; they agree on which steps are readable.
        """
        steps = sorted(self.all_steps(), reverse=True)
        failures: list[str] = []
        unreadable: list[int] = []
        for step in steps:
            try:
                meta = self.restore_meta(step)
            except Exception as e:  # Orbax/tensorstore raise many types for a damaged step
                meta, error = None, e
            if meta is not None:
                check_meta(meta)
                error = None
                state = None
                if abstract_state is not None:
                    try:
                        state, meta = self.restore(step, abstract_state)
                    except Exception as e:
                        error = e
            if all_processes_succeeded(error is None):
                if failures:
                    logging.warning(
                        "resuming from step %d of %s (newer steps unreadable: %s)",
                        step,
                        self.directory,
                        "; ".join(failures),
                    )
                for bad in unreadable:  # only now that there is a step to fall back to
                    self.quarantine(bad)
                return step, state, meta
            failures.append(f"step {step}: {first_line(error) if error else 'another process'}")
            unreadable.append(step)
        if unreadable:
            raise UnreadableCheckpointError(
                f"no readable checkpoint in {self.directory} ({'; '.join(failures)}); nothing "
                "was changed: restore the directory from a backup, or move it aside to start "
                "this stage over"
            )
        return None

    def quarantine_all(self) -> None:
        """Move every step aside: only for derived data that the caller computes again."""
        for step in self.all_steps():
            self.quarantine(step)

    def quarantine(self, step: int) -> None:
        """Move an unreadable step out of Orbax's sight (kept for inspection, never deleted)."""
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            target = self.directory / f"{step}.unreadable-{stamp}"
            try:
                (self.directory / str(step)).rename(target)
            except Exception as e:  # e.g. an object store that cannot rename directories
                raise UnreadableCheckpointError(
                    f"checkpoint step {step} in {self.directory} is unreadable and could not be "
                    f"moved aside ({first_line(e)}); move it out of the directory and run again"
                ) from e
            logging.warning("checkpoint step %d is unreadable; moved it to %s", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantined {self.directory} {step}")
        self._manager.reload()

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        """Close on every exit path (finishing an in-flight save), except when a collective failed
        in a multi-process job: a peer is gone, closing would wait for it at a barrier, and the
        job exits at once (``jobs/cli.py``); complete steps are already on disk."""
        if isinstance(exc, jax.errors.JaxRuntimeError) and jax.process_count() > 1:
            return
        self.close()


class _Manager(ocp.CheckpointManager):
    """Orbax's manager without its own preemption check: the stages ask theirs once per step with
    the process' step counter and save with ``force`` at a preemption (``runtime/preemption.py``).
    Orbax's check reports the loop's own step numbers to JAX's preemption sync manager, which
    sets the sync point one past the highest number reported: mixed with the process' counter,
    it could set one that no later call asks for."""

    def reached_preemption(self, step: int) -> bool:
        del step
        return False


def all_processes_succeeded(ok: bool) -> bool:
    """Whether every process succeeded: a step some process cannot read is unreadable for all."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray([ok]))))
