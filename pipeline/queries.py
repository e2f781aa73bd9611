"""Train → test: each of the first ``score.num_queries`` eval examples traced back to its
``score.top_k`` strongest training proponents and opponents (Alg. 1, line 26).

The train projections are read part by part and merged into a running top-k, so they never need to
fit in memory at once. With ``distill.tail`` the ranking is by the tail-corrected influence
(``influence.scoring.influence``), whose full-gradient products ⟨∇ℓ(x), ∇ℓ(z)⟩ the score job saved
as each row's ``query_dots`` (the query gradients were extra tangents or GEMM columns); both values
are written.
"""

from typing import Any

import jax
import numpy as np
import pyarrow as pa
from absl import logging
from etils import epath

from influence import scoring
from parallel import sharding, steps
from pipeline import outputs, parts
from pipeline.stage import Stage

TOPK_FILE = "influence_topk.parquet"


def query_gradients(stage: Stage, params: Any, num_queries: int) -> Any:
    """∇ℓ(z) of the first ``num_queries`` eval examples, stacked and laid out like G (every
    process reads the same few rows)."""
    evaluation = stage.split("eval")
    count = min(num_queries, evaluation.num_examples)
    columns = stage.task.model_inputs(evaluation.take(np.arange(count)))
    repl = sharding.replicated(stage.mesh)
    batch = {
        k: jax.make_array_from_process_local_data(repl, np.asarray(v)) for k, v in columns.items()
    }
    grads = steps.jit_example_grads(
        stage.task.per_example_loss, stage.param_sh, stage.vector_sh, stage.mesh, stage.selection
    )
    return grads(params, batch)


def trace(
    scores_dir: epath.Path,
    eigvals: np.ndarray,
    num_queries: int,
    top_k: int,
    sigma: float | None = None,
) -> None:
    """Write ``TOPK_FILE``: per query, kind (proponent/opponent), rank, train id and influence
    (and ``influence_tail``, the ranking, with the tail's ``sigma``)."""
    queries = outputs.read_parquet_dir(scores_dir / "eval")
    queries = queries.slice(0, min(num_queries, queries.num_rows))
    g_query, query_ids = parts.projections(queries), queries.column("id").to_numpy()
    names = ("influence", "influence_tail") if sigma is not None else ("influence",)
    records: dict[str, list[Any]] = {
        k: [] for k in ("query_id", "kind", "rank", "train_id", *names)
    }
    for kind, sign in (("proponent", 1.0), ("opponent", -1.0)):
        best = np.empty((0, len(query_ids), len(names)), np.float32)
        best_ids = np.empty((0, len(query_ids)), np.int64)
        for file in sorted((scores_dir / "train").glob("part-*.parquet")):
            part = outputs.read_parquet(file)
            g = parts.projections(part)
            values = [np.asarray(scoring.influence(g, g_query, eigvals))]
            if sigma is not None:
                dots = parts.projections(part, "query_dots")[:, : len(query_ids)]
                values.append(np.asarray(scoring.influence(g, g_query, eigvals, dots, sigma)))
            values = np.stack(values, axis=-1)  # (rows, queries, names)
            ids = np.broadcast_to(part.column("id").to_numpy()[:, None], values.shape[:2])
            candidates = np.concatenate([best, values])
            candidate_ids = np.concatenate([best_ids, ids])
            keep, _ = scoring.top_influential(
                sign * candidates[..., -1], min(top_k, len(candidates))
            )
            keep = np.asarray(keep).T  # (k, queries)
            best = np.take_along_axis(candidates, keep[..., None], axis=0)
            best_ids = np.take_along_axis(candidate_ids, keep, axis=0)
        for q, query_id in enumerate(query_ids):
            for rank in range(best.shape[0]):
                records["query_id"].append(query_id)
                records["kind"].append(kind)
                records["rank"].append(rank)
                records["train_id"].append(best_ids[rank, q])
                for i, name in enumerate(names):
                    records[name].append(best[rank, q, i])
    outputs.write_parquet(scores_dir / TOPK_FILE, pa.table(records))
    logging.info("traced %d queries to their top-%d training examples", len(query_ids), top_k)
