"""Append-only checkpoints: each save holds only what was added since the previous save.

Arnoldi's Krylov state grows by one basis vector and one Hessenberg column per iteration. A save
of the whole state writes (n + 1) × p floats every time, unused rows included: 240 GB for a
300M-parameter model at n = 200, where a preemption notice gives about 30 s. Here each save is a
*piece*: an ordinary Orbax step holding what the state gained since the previous saved step, whose
meta names that step (``previous``), so the pieces chain back to the first. The state at step s
is the chain's pieces up to s, assembled in order by the caller onto the current mesh (each piece
is restored with the caller's shardings, so another topology reads them too).

- A save writes the new piece only: its bytes grow with the iterations since the last save, not
  with the iteration reached. Nothing is ever removed at a save: every piece holds rows the state
  needs.
- A restore walks the chain from its first piece. A piece that cannot be read (truncated,
  garbage, unreadable on another process) ends the chain there: the state is the one before it,
  as a damaged whole checkpoint falls back to the step before. That piece and every step after it
  are moved aside (kept, never deleted) only then, once there is a complete state to fall back
  to, so later saves can use their step numbers again. With no readable piece at all, it is an
  error and nothing is moved.
"""

from collections.abc import Callable
from typing import Any

from absl import logging

from checkpoints.checkpointer import (
    Checkpointer,
    IncompatibleCheckpointError,
    UnreadableCheckpointError,
    all_processes_succeeded,
)
from runtime.errors import first_line

PREVIOUS = "previous"  # meta: the step the piece follows (0: the first piece)


class Pieces:
    """A chain of pieces in one ``Checkpointer`` (which must keep every step: max_to_keep=None)."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer
        self.last = 0  # the chain's last step (0: none yet)

    def save(self, step: int, piece: Any, meta: dict[str, Any]) -> None:
        """Save ``piece``, what the state gained from step ``self.last`` to ``step``."""
        self.checkpointer.save(step, piece, {**meta, PREVIOUS: self.last}, force=True)
        self.last = step

    def restore(
        self,
        check_meta: Callable[[dict[str, Any]], None],
        abstract_piece: Callable[[dict[str, Any]], Any],
        consume: Callable[[dict[str, Any], Any], None],
    ) -> int:
        """Feed the chain's pieces in order to ``consume(meta, piece)``; returns the step reached
        (0: no piece). ``check_meta`` runs on each piece's meta first and may raise (another
        config: nothing is moved); ``abstract_piece(meta)`` gives the restore target. Every
        process must call this; they agree on which pieces are readable."""
        ckpt = self.checkpointer
        steps = sorted(ckpt.all_steps())
        reached, failure = 0, None
        for step in steps:
            meta, error = None, None
            try:
                meta = ckpt.restore_meta(step)
            except Exception as e:  # Orbax/tensorstore raise many types for a damaged step
                error = e
            if meta is not None:
                check_meta(meta)
                if PREVIOUS not in meta:
                    raise IncompatibleCheckpointError(
                        f"{ckpt.directory} holds whole states written by an earlier version, not "
                        "pieces; move it aside (or delete it) to run this stage from the start"
                    )
                if meta[PREVIOUS] != reached:  # not part of this chain (left by an older one)
                    failure = f"step {step} follows step {meta[PREVIOUS]}, not {reached}"
                    break
                target = abstract_piece(meta)  # outside the try: a bug here is not damage
                try:
                    piece, meta = ckpt.restore(step, target)
                except Exception as e:
                    error = e
            if not all_processes_succeeded(error is None):
                failure = f"step {step}: {first_line(error) if error else 'another process'}"
                break
            consume(meta, piece)
            reached = step
        rest = [step for step in steps if step > reached]
        if rest and not reached:
            raise UnreadableCheckpointError(
                f"no readable checkpoint in {ckpt.directory} ({failure}); nothing was changed: "
                "restore the directory from a backup, or move it aside to start this stage over"
            )
        if rest:
            logging.warning(
                "resuming from step %d of %s: %s; moving steps %s aside",
                reached,
                ckpt.directory,
                failure,
                rest,
            )
            for step in rest:
                ckpt.quarantine(step)
        self.last = reached
        return reached
