"""Scoring output in parts: one Parquet file per part of a split, the unit of resumption.

``scores/<split>/part-XXXXX-of-YYYYY.parquet`` holds rows [start, stop) of the split: the example
id, the task's record columns and corruption flag (MNIST: label, flipped), self-influence and the
p̃ projections g(x); with ``distill.tail`` also ‖∇ℓ(x)‖² (``grad_sqnorm``), the tail-corrected
self-influence (``self_influence_tail``) and, when queries are traced, ⟨∇ℓ(x), ∇ℓ(z_j)⟩ for each
query z_j (``query_dots``). A part file is written
atomically by the process that scored it (the leader of its row group), so a restarted job skips
finished parts and reading the directory gives every example exactly once. The rows of a part cut
short by a preemption go to ``_partial.<part>.parquet`` (a leading '_' hides it from readers);
the next run scores only the rest of that part.
"""

import dataclasses

import jax
import numpy as np
import pyarrow as pa
from etils import epath
from jax.experimental import multihost_utils

from influence import scoring
from pipeline import outputs
from pipeline.data import Part


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the projector's rows hold (``pipeline/tangents.py``): p̃ projections, then
    ``num_dots`` products with the queries' tangents, the validation influence (with
    ``validation``), and, where a σ is set, ‖∇ℓ(x)‖² last (⟨∇ℓ(x), P∇ℓ(x)⟩ with ``quadratic``:
    an ``Operator`` method's self-influence, absent when ``self_influence`` is off); ``sigma``
    the tail's σ or None."""

    num_vectors: int
    num_dots: int = 0
    sigma: float | None = None
    intrinsic: bool = False  # σ is the method's own (graddot, an Operator's 1): the plain scores
    validation: bool = False
    quadratic: bool = False
    self_influence: bool = True

    @property
    def last(self) -> bool:
        """Whether the rows end with ‖∇ℓ(x)‖² (or an Operator's quadratic form)."""
        return self.sigma is not None and self.self_influence

    def table(
        self, columns: dict[str, np.ndarray], rows: np.ndarray, eigvals: np.ndarray
    ) -> pa.Table:
        """A part's rows: the host ``columns`` (``Task.output_columns``), self-influence (Alg. 1,
        line 24) and the projections, the validation influence, and the tail's columns."""
        g = rows[:, : self.num_vectors]
        sqnorm = rows[:, -1] if self.last else None
        plain = (sqnorm, self.sigma) if self.intrinsic else (None, None)
        out = dict(columns)
        if self.self_influence:
            si = scoring.self_influence(g, eigvals, *plain)
            out["self_influence"] = np.asarray(si, np.float32)
        if self.num_vectors:  # none for graddot (Arrow has no lists of length 0)
            out["projections"] = _matrix(g)
        if self.validation:
            out["validation_influence"] = rows[:, self.num_vectors + self.num_dots]
        if self.sigma is not None:
            if self.last and not self.quadratic:
                out["grad_sqnorm"] = np.asarray(sqnorm, np.float32)
            if not self.intrinsic:
                out["self_influence_tail"] = np.asarray(
                    scoring.self_influence(g, eigvals, sqnorm, self.sigma), np.float32
                )
            if self.num_dots:
                out["query_dots"] = _matrix(
                    rows[:, self.num_vectors : self.num_vectors + self.num_dots]
                )
        return pa.table(out)


def _matrix(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(values, np.float32).reshape(-1), pa.float32()),
        values.shape[1],
    )


def projections(part: pa.Table, name: str = "projections") -> np.ndarray:
    """The (rows, p̃) float32 projections of a part table (or another matrix column); a method
    without eigenvectors (graddot) wrote none: (rows, 0)."""
    if name == "projections" and name not in part.column_names:
        return np.zeros((part.num_rows, 0), np.float32)
    column = part.column(name).combine_chunks()
    values = column.flatten().to_numpy()
    return values.reshape(len(column), values.size // max(len(column), 1)).astype(np.float32)


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
