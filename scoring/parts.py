"""Scoring output in parts: one Parquet file per part of a split, the unit of resumption.

``scores/<split>/part-XXXXX-of-YYYYY.parquet`` holds rows [start, stop) of the split, as
``scoring/row_layout.py`` lays them out. A part file is written atomically by the process that
scored it (the leader of its row group), so a restarted job skips finished parts and reading the
directory gives every example exactly once. The rows of a part cut short by a preemption go to
``_partial.<part>.parquet`` (a leading '_' hides it from readers); the next run scores only the
rest of that part.
"""

import dataclasses

import jax
import numpy as np
import pyarrow as pa
from etils import epath
from jax.experimental import multihost_utils

from runtime import outputs
from scoring.row_layout import Layout


@dataclasses.dataclass(frozen=True)
class Part:
    """Rows [start, stop) of a split: one output file, the unit of resumption when scoring.

    ``done`` rows from ``start`` on were scored by a preempted run and saved; scoring continues
    at ``start + done``.
    """

    split: str
    index: int
    num_parts: int
    start: int
    stop: int
    done: int = 0

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-of-{self.num_parts:05d}"


def parts(split: str, num_examples: int, examples_per_shard: int) -> list[Part]:
    count = -(-num_examples // examples_per_shard)
    return [
        Part(
            split, i, count, i * examples_per_shard, min((i + 1) * examples_per_shard, num_examples)
        )
        for i in range(count)
    ]


def part_path(scores_dir: epath.Path, part: Part) -> epath.Path:
    return scores_dir / part.split / f"{part.name}.parquet"


def partial_path(scores_dir: epath.Path, part: Part) -> epath.Path:
    """Rows of an unfinished part saved at a preemption (a leading '_' hides it from readers)."""
    return scores_dir / part.split / f"_partial.{part.name}.parquet"


def remaining(scores_dir: epath.Path, plan: list[Part]) -> list[Part]:
    """Parts without an output file, each with the rows a preempted run already saved, as process 0
    sees them and identical on every process (files appear while other processes are writing, so
    each process must not look for itself)."""
    done = np.zeros(len(plan), np.int64)  # -1: finished; else rows saved in a partial file
    if jax.process_index() == 0:
        for i, part in enumerate(plan):
            partial = partial_path(scores_dir, part)
            if part_path(scores_dir, part).exists():
                done[i] = -1
                if partial.exists():  # the run stopped between writing the part and this cleanup
                    partial.unlink()
            elif partial.exists():
                done[i] = outputs.read_parquet(partial).num_rows
                if done[i] == part.stop - part.start:  # complete, only not renamed yet
                    partial.rename(part_path(scores_dir, part))
                    done[i] = -1
    if jax.process_count() > 1:
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    return [
        dataclasses.replace(part, done=int(rows))
        for part, rows in zip(plan, done, strict=True)
        if rows >= 0
    ]


class PartWriter:
    """Collects one part's rows as they are scored; writes the part, or its partial at a stop.

    ``enabled`` is False on the processes that are not the leader of their row group: they score
    the same rows as the leader, which alone writes them.
    """

    def __init__(self, scores_dir: epath.Path, eigvals: np.ndarray, layout: Layout, enabled: bool):
        self._dir, self._eigvals, self._enabled = scores_dir, eigvals, enabled
        self._layout = layout
        self._part: Part | None = None
        self._columns: list[dict[str, np.ndarray]] = []
        self._projections: list[np.ndarray] = []

    def add(self, part: Part, columns: dict[str, np.ndarray], g: np.ndarray) -> None:
        if part != self._part:
            self._part, self._columns, self._projections = part, [], []
        self._columns.append(columns)
        self._projections.append(g)

    def _merged(self) -> pa.Table:
        merged = {k: np.concatenate([c[k] for c in self._columns]) for k in self._columns[0]}
        rows = self._layout.table(merged, np.concatenate(self._projections), self._eigvals)
        if self._part.done:  # rows scored before a preemption come first
            saved = outputs.read_parquet(partial_path(self._dir, self._part))
            rows = pa.concat_tables([saved, rows.cast(saved.schema)])
        return rows

    def finish(self) -> None:
        """The part is complete: write it atomically, then drop its partial file."""
        if self._enabled:
            outputs.write_parquet(part_path(self._dir, self._part), self._merged())
            partial = partial_path(self._dir, self._part)
            if self._part.done and partial.exists():
                partial.unlink()
        self._part = None

    def save_partial(self) -> None:
        """Preempted mid-part: keep the rows scored so far, to continue from there."""
        if self._enabled and self._part is not None and self._columns:
            outputs.write_parquet(partial_path(self._dir, self._part), self._merged())
