"""What a scored row holds and how it becomes the columns of a part file.

``scores/<split>/part-*.parquet`` rows: the example id, the task's record columns and corruption
flag (MNIST: label, flipped), self-influence and the p̃ projections g(x); with ``distill.tail``
also ‖∇ℓ(x)‖² (``grad_sqnorm``), the tail-corrected self-influence (``self_influence_tail``) and,
when queries are traced, ⟨∇ℓ(x), ∇ℓ(z_j)⟩ for each query z_j (``query_dots``); with
``score.validation`` the influence on the mean validation loss (``validation_influence``).
"""

import dataclasses

import numpy as np
import pyarrow as pa

from influence import scoring


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the products program's rows hold (``scoring/tangents.py``): p̃ projections, then
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
