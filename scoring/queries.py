"""Train → test: each of the first ``score.num_queries`` eval examples traced back to its
``score.top_k`` strongest training proponents and opponents (Alg. 1, line 26).

The train projections are read part by part and merged into a running top-k, so they never need to
fit in memory at once. With ``distill.tail`` the ranking is by the tail-corrected influence
(``influence.scoring.influence``), whose full-gradient products ⟨∇ℓ(x), ∇ℓ(z)⟩ the score job saved
as each row's ``query_dots`` (the query gradients were extra tangents or GEMM columns); both values
are written.
"""

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import pyarrow as pa
from absl import logging
from etils import epath

from influence import scoring
from methods.base import Context
from parallel import programs, sharding
from runtime import outputs
from scoring import row_layout
from tasks.sources import Columns

TOPK_FILE = "influence_topk.parquet"
# Queries scored against a training part at once: the block is (part rows × QUERY_BLOCK) floats.
QUERY_BLOCK = 1024


def query_gradients(ctx: Context, params: Any, num_queries: int) -> Any:
    """∇ℓ(z) of the first ``num_queries`` eval examples, stacked and laid out like G (every
    process reads the same few rows)."""
    evaluation = ctx.split("eval")
    count = min(num_queries, evaluation.num_examples)
    return example_gradients(ctx, params, evaluation.take(np.arange(count)))


def example_gradients(ctx: Context, params: Any, examples: Columns) -> Any:
    """∇ℓ(z) of a few examples given as host columns (the same on every process: the batch is
    replicated), stacked and laid out like G."""
    columns = ctx.task.model_inputs(examples)
    repl = sharding.replicated(ctx.mesh)
    batch = {
        k: jax.make_array_from_process_local_data(repl, np.asarray(v)) for k, v in columns.items()
    }
    grads = programs.jit_example_grads(
        ctx.task.per_example_loss, ctx.param_sh, ctx.vector_sh, ctx.mesh, ctx.selection
    )
    return grads(params, batch)


def trace(
    scores_dir: epath.Path,
    eigvals: np.ndarray,
    num_queries: int,
    top_k: int,
    sigma: float | None = None,
    query_block: int = QUERY_BLOCK,
    intrinsic: bool = False,
) -> None:
    """Write ``TOPK_FILE``: per query, kind (proponent/opponent), rank, train id and influence
    (and ``influence_tail``, the ranking, with the tail's ``sigma``; a method's own ``sigma``,
    ``intrinsic``, is in ``influence`` itself).

    Memory is bounded whatever the number of queries and training examples: the training parts
    are read one at a time, each scored against ``query_block`` queries at once (a (rows ×
    query_block) block of influences), and merged into a running top-k per query and kind, so
    what is held is one part, one block and (num_queries × top_k) candidates.
    """
    query_table, names, blocks = influences(
        scores_dir, eigvals, num_queries, sigma, query_block, intrinsic
    )
    query_ids = query_table.column("id").to_numpy()
    best = {kind: TopK(top_k, len(query_ids), len(names)) for kind in KINDS}
    for part, block, values in blocks:
        for kind, sign in KINDS.items():
            best[kind].merge(block, sign * values[..., -1], values, part.column("id").to_numpy())
    tables = [best[kind].table(kind, query_ids, names) for kind in KINDS]
    outputs.write_parquet(scores_dir / TOPK_FILE, pa.concat_tables(tables))
    logging.info("traced %d queries to their top-%d training examples", len(query_ids), top_k)


Blocks = Iterator[tuple[pa.Table, slice, np.ndarray]]


def influences(
    scores_dir: epath.Path,
    eigvals: np.ndarray,
    num_queries: int,
    sigma: float | None,
    query_block: int = QUERY_BLOCK,
    intrinsic: bool = False,
) -> tuple[pa.Table, tuple[str, ...], Blocks]:
    """(the first ``num_queries`` eval rows, the names of the values, the blocks): each block is
    (a training part, a slice of the queries, their influences (part rows × queries in the slice
    × names)), the parts read one at a time. Names: ``influence`` (Alg. 1, line 26) and, with the
    tail's ``sigma``, ``influence_tail`` last; a method's own σ (``intrinsic``) is in
    ``influence`` itself. The last name is the ranking."""
    queries = outputs.read_parquet_dir(scores_dir / "eval")
    queries = queries.slice(0, min(num_queries, queries.num_rows))
    g_query = row_layout.projections(queries)
    names = ("influence", "influence_tail") if sigma is not None else ("influence",)
    if intrinsic:
        names = ("influence",)

    def blocks() -> Blocks:
        for file in sorted((scores_dir / "train").glob("part-*.parquet")):
            part = outputs.read_parquet(file)
            g = row_layout.projections(part)
            dots = row_layout.projections(part, "query_dots") if sigma is not None else None
            for start in range(0, len(g_query), query_block):
                block = slice(start, min(start + query_block, len(g_query)))
                values = [] if intrinsic else [scoring.influence(g, g_query[block], eigvals)]
                if sigma is not None:
                    tail = scoring.influence(g, g_query[block], eigvals, dots[:, block], sigma)
                    values.append(tail)
                yield part, block, np.stack([np.asarray(v) for v in values], axis=-1)

    return queries, names, blocks()


# Proponents rank by decreasing influence, opponents by increasing.
KINDS = {"proponent": 1.0, "opponent": -1.0}


class TopK:
    """A running top-k over training rows for every query: keys (k, queries), the values kept
    beside them (k, queries, names) and the rows' ids; −inf keys are empty slots."""

    def __init__(self, k: int, num_queries: int, width: int) -> None:
        self.keys = np.full((k, num_queries), -np.inf, np.float32)
        self.values = np.zeros((k, num_queries, width), np.float32)
        self.ids = np.full((k, num_queries), -1, np.int64)

    def merge(self, block: slice, keys: np.ndarray, values: np.ndarray, ids: np.ndarray) -> None:
        """Fold in ``keys`` (rows, queries in ``block``) of the training rows ``ids``; ties keep
        the row seen first."""
        k = self.keys.shape[0]
        keys = np.concatenate([self.keys[:, block], keys])
        values = np.concatenate([self.values[:, block], values])
        rows = np.broadcast_to(ids[:, None], (len(ids), keys.shape[1]))
        ids = np.concatenate([self.ids[:, block], rows])
        # XLA's TopK: O(n log k) per query, and of equal keys the lower index (the earlier row).
        order = np.asarray(scoring.top_influential(keys, k)[0]).T
        self.keys[:, block] = np.take_along_axis(keys, order, axis=0)
        self.values[:, block] = np.take_along_axis(values, order[..., None], axis=0)
        self.ids[:, block] = np.take_along_axis(ids, order, axis=0)

    def table(self, kind: str, query_ids: np.ndarray, names: tuple[str, ...]) -> pa.Table:
        """One row per (query, rank) filled, query-major, ranks in order."""
        k, num_queries = self.keys.shape
        filled = np.isfinite(self.keys.T).ravel()
        columns = {
            "query_id": np.repeat(query_ids, k)[filled],
            "kind": np.full(filled.sum(), kind),
            "rank": np.tile(np.arange(k), num_queries)[filled],
            "train_id": self.ids.T.ravel()[filled],
        }
        for i, name in enumerate(names):
            columns[name] = self.values[..., i].T.ravel()[filled]
        return pa.table(columns)
