"""Fact tracing: for each traced query, how well the influence ranking of the training split finds
the training examples relevant to it (``Task.relevance_column``: the passages stating the fact the
query asks for; TrackStar's protocol, Chang et al. 2024).

Two streams over the training parts, so memory stays flat in the number of examples: the first
gathers the relevant examples' influences, the second counts, for each of them, the other examples
that score above it (``influence.metrics.ranked_retrieval`` turns the counts into recall@10, MRR
and AUC). Each ranking the scores hold is measured: the plain influence and, with a tail, the
tail-corrected one.
"""

import numpy as np
from etils import epath

from influence import metrics
from scoring import queries


def retrieval(
    scores_dir: epath.Path,
    eigvals: np.ndarray,
    num_queries: int,
    column: str,
    sigma: float | None = None,
    intrinsic: bool = False,
    k: int = 10,
) -> dict[str, list[dict]]:
    """{ranking name: one row per traced query that has relevant training examples (its id, its
    ``column`` value, how many are relevant, recall@k, MRR, AUC)}; empty when no traced query has
    a relevant example."""

    def stream():
        return queries.influences(scores_dir, eigvals, num_queries, sigma, intrinsic=intrinsic)

    query_table, names, blocks = stream()
    keys = query_table.column(column).to_numpy()
    found: dict[tuple[int, int], list[float]] = {}  # (name, query) → relevant scores
    for part, block, values in blocks:
        mine = part.column(column).to_numpy()
        for q in range(block.start, block.stop):
            if keys[q] >= 0 and (rows := np.flatnonzero(mine == keys[q])).size:
                for n in range(len(names)):
                    found.setdefault((n, q), []).extend(values[rows, q - block.start, n])
    if not found:
        return {}
    counts = {key: np.zeros((2, len(v)), np.int64) for key, v in found.items()}
    total = 0
    for part, block, values in stream()[2]:
        mine = part.column(column).to_numpy()
        total += part.num_rows if block.start == 0 else 0
        for (n, q), relevant in found.items():
            if block.start <= q < block.stop:
                others = values[mine != keys[q], q - block.start, n][:, None]
                counts[n, q][0] += (others > np.asarray(relevant)[None]).sum(axis=0)
                counts[n, q][1] += (others == np.asarray(relevant)[None]).sum(axis=0)
    out: dict[str, list[dict]] = {name: [] for name in names}
    for (n, q), relevant in sorted(found.items()):
        negatives = total - len(relevant)
        row = metrics.ranked_retrieval(np.asarray(relevant), *counts[n, q], negatives, k)
        ids = query_table.column("id").to_numpy()
        out[names[n]].append(
            {"query_id": int(ids[q]), column: int(keys[q]), "relevant": len(relevant), **row}
        )
    return out
