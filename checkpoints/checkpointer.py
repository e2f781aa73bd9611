"""A small typed wrapper around ``orbax.checkpoint.CheckpointManager``.

Every checkpoint of this project is a pair: ``state`` (a pytree of arrays, saved with
StandardSave, restorable onto any mesh through target shardings) and ``meta`` (a JSON dict: the
config fingerprint, counters, anything a later job must check before it trusts the state).
Callers say save / restore; they never see Orbax args.
"""

import dataclasses
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

STATE = "state"
META = "meta"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or incompatible with the config."""


@dataclasses.dataclass
class Checkpointer:
    """Orbax options with the defaults this project relies on.

    Attributes:
      directory: where steps live (local path or gs://), created on first save.
      max_to_keep: completed steps kept; 2 so that a corrupted latest step has a fallback.
      save_interval_steps: ``save`` is a no-op for other steps unless ``force``.
      async_save: write in a background thread; arrays are copied to host before ``save`` returns,
        so the caller may donate or overwrite them at once.
    """

    directory: epath.PathLike
    max_to_keep: int | None = 2
    save_interval_steps: int = 1
    async_save: bool = True

    def __post_init__(self) -> None:
        self.directory = epath.Path(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.max_to_keep,
            save_interval_steps=self.save_interval_steps,
            enable_async_checkpointing=self.async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

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

    def reached_preemption(self, step: int) -> bool:
        return self._manager.reached_preemption(step)

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
