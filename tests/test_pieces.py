"""Append-only checkpoints (checkpoints/pieces.py) on a small state: a chain assembles in order,
a piece of another chain or of the whole-state format is never mixed in."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.checkpointer import Checkpointer, IncompatibleCheckpointError
from checkpoints.pieces import PREVIOUS, Pieces


def _rows(first: int, last: int) -> dict:
    return {"rows": jnp.arange(first, last, dtype=jnp.float32)}


def _abstract(meta: dict) -> dict:
    first, last = meta["rows"]
    return {"rows": jax.ShapeDtypeStruct((last - first,), jnp.float32)}


def _restore(directory: Path) -> tuple[int, list[float], list[int]]:
    seen: list[float] = []
    with Checkpointer(directory, max_to_keep=None, async_save=False) as ckpt:
        pieces = Pieces(ckpt)
        done = pieces.restore(lambda meta: None, _abstract, lambda m, p: seen.extend(p["rows"]))
        return done, seen, ckpt.all_steps()


def test_chain_assembles_in_order_and_saves_only_what_is_new(tmp_path: Path) -> None:
    with Checkpointer(tmp_path / "k", max_to_keep=None, async_save=False) as ckpt:
        pieces = Pieces(ckpt)
        for previous, done in ((0, 3), (3, 5), (5, 9)):
            first = previous + 1 if previous else 0
            pieces.save(done, _rows(first, done + 1), {"rows": [first, done + 1]})
        assert [ckpt.restore_meta(s)[PREVIOUS] for s in (3, 5, 9)] == [0, 3, 5]
    done, seen, steps = _restore(tmp_path / "k")
    assert done == 9 and steps == [3, 5, 9]
    np.testing.assert_array_equal(seen, np.arange(10))


def test_a_piece_of_another_chain_ends_it_and_is_moved_aside(tmp_path: Path) -> None:
    """A step whose ``previous`` is not the chain's last step (left by an older run) is not
    assembled: the state is the chain before it, the step is moved aside, never deleted."""
    with Checkpointer(tmp_path / "k", max_to_keep=None, async_save=False) as ckpt:
        ckpt.save(3, _rows(0, 4), {"rows": [0, 4], PREVIOUS: 0}, force=True)
        ckpt.save(7, _rows(6, 8), {"rows": [6, 8], PREVIOUS: 5}, force=True)
    done, seen, steps = _restore(tmp_path / "k")
    assert done == 3 and steps == [3]
    np.testing.assert_array_equal(seen, np.arange(4))
    assert [p.name.split(".")[0] for p in (tmp_path / "k").glob("*.unreadable-*")] == ["7"]


def test_whole_states_of_an_earlier_version_are_refused(tmp_path: Path) -> None:
    with Checkpointer(tmp_path / "k", max_to_keep=None, async_save=False) as ckpt:
        ckpt.save(4, _rows(0, 5), {"rows": [0, 5]}, force=True)
    with pytest.raises(IncompatibleCheckpointError, match="whole states written by an earlier"):
        _restore(tmp_path / "k")
    assert (tmp_path / "k" / "4").exists()


def test_each_directory_has_its_own_barrier_names(tmp_path: Path, monkeypatch) -> None:
    """Orbax names its save barriers after ``barrier_sync_key_prefix``: two managers saving at once
    (training's asynchronous state, the params kept after an epoch) need different prefixes, and
    one directory the same prefix on every process, whatever its working directory (the race
    itself: tests/test_multiprocess.py::test_two_checkpointers_save_at_once)."""

    def prefix(directory: Path | str) -> str:
        with Checkpointer(directory) as ckpt:
            return ckpt._manager._multiprocessing_options.barrier_sync_key_prefix

    names = {prefix(tmp_path / "w" / name) for name in ("train_state", "epoch_params", "params")}
    assert len(names) == 3
    monkeypatch.chdir(tmp_path)
    assert prefix("w/params") == prefix(tmp_path / "w" / "params")
