"""Train → test for many queries with bounded memory (issue 11, item 4).

    .venv/bin/python -m benchmarks.many_queries [--num_train=100000] [--num_queries=10000]

Writes a scores directory as the score job leaves it (random projections, p̃ = ``--top_k`` columns,
training parts of ``--part_rows``), then runs ``scoring.queries.trace``: every query against every
training example, a running top-k of proponents and opponents per query. Prints the wall time,
the peak of Python/NumPy allocations during the trace (``tracemalloc``) against the size of the
whole (train × query) influence matrix that ranking it at once would hold, and the size of the
Parquet output, for each ``--query_block``.
"""

import tempfile
import time
import tracemalloc

import numpy as np
import pyarrow as pa
from absl import app, flags
from etils import epath

from runtime import outputs
from scoring import queries

_NUM_TRAIN = flags.DEFINE_integer("num_train", 100_000, "Training examples.")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 10_000, "Queries (eval examples).")
_TOP_K = flags.DEFINE_integer("top_k", 100, "p̃: projection columns.")
_KEEP = flags.DEFINE_integer("keep", 10, "Proponents and opponents kept per query.")
_PART_ROWS = flags.DEFINE_integer("part_rows", 2000, "Rows per training part.")
_BLOCKS = flags.DEFINE_list("query_block", ["256", "1024"], "score.query_block values.")


def _matrix(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])


def write_scores(root: epath.Path, rng: np.random.Generator) -> np.ndarray:
    """Train and eval parts of random projections; the eigenvalues."""
    for i, start in enumerate(range(0, _NUM_TRAIN.value, _PART_ROWS.value)):
        rows = min(_PART_ROWS.value, _NUM_TRAIN.value - start)
        g = rng.normal(size=(rows, _TOP_K.value)).astype(np.float32)
        table = pa.table({"id": np.arange(start, start + rows), "projections": _matrix(g)})
        outputs.write_parquet(root / "train" / f"part-{i:05d}.parquet", table)
    g = rng.normal(size=(_NUM_QUERIES.value, _TOP_K.value)).astype(np.float32)
    table = pa.table({"id": np.arange(_NUM_QUERIES.value) + 10**9, "projections": _matrix(g)})
    outputs.write_parquet(root / "eval" / "part-00000.parquet", table)
    return rng.uniform(0.1, 10.0, _TOP_K.value).astype(np.float32)


def main(argv: list[str]) -> None:
    del argv
    root = epath.Path(tempfile.mkdtemp(prefix="many_queries-"))
    eigvals = write_scores(root, np.random.default_rng(0))
    whole = _NUM_TRAIN.value * _NUM_QUERIES.value * 4
    print(
        f"{_NUM_QUERIES.value:,} queries x {_NUM_TRAIN.value:,} training examples, "
        f"p̃ = {_TOP_K.value}, top {_KEEP.value} each way, parts of {_PART_ROWS.value:,} rows; "
        f"the whole influence matrix: {whole / 2**20:,.0f} MiB"
    )
    print(" query_block   wall (s)   peak allocated (MiB)   peak / whole matrix   output (MiB)")
    for block in map(int, _BLOCKS.value):
        tracemalloc.start()
        start = time.perf_counter()
        queries.trace(root, eigvals, _NUM_QUERIES.value, _KEEP.value, query_block=block)
        wall = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        size = (root / queries.TOPK_FILE).stat().length
        print(
            f"{block:12d} {wall:10.2f} {peak / 2**20:22.1f} {peak / whole:21.4f} "
            f"{size / 2**20:14.1f}"
        )
        (root / queries.TOPK_FILE).unlink()
    root.rmtree()


if __name__ == "__main__":
    app.run(main)
