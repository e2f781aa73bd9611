"""Train → test tracing over many queries (issue 11, item 4): the blocked, streaming top-k of
``scoring/queries.trace`` equals ranking the whole (train × query) influence matrix at once,
whatever the query block, the part sizes and the tail."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from influence import scoring
from runtime import outputs
from scoring import queries

P_TILDE, NUM_QUERIES, TOP_K = 5, 23, 7
PART_ROWS = (37, 50, 13)


def _matrix(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])


@pytest.fixture(scope="module")
def scores(tmp_path_factory: pytest.TempPathFactory):
    """A scores directory as the score job leaves it: train parts with projections and the
    queries' full-gradient products, eval parts whose first rows are the queries."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("scores")
    g_train = rng.normal(size=(sum(PART_ROWS), P_TILDE)).astype(np.float32)
    dots = rng.normal(size=(len(g_train), NUM_QUERIES)).astype(np.float32)
    g_eval = rng.normal(size=(NUM_QUERIES + 4, P_TILDE)).astype(np.float32)
    train_ids = rng.permutation(1000)[: len(g_train)]
    start = 0
    for i, rows in enumerate(PART_ROWS):
        part = slice(start, start + rows)
        table = {
            "id": train_ids[part],
            "projections": _matrix(g_train[part]),
            "query_dots": _matrix(dots[part]),
        }
        outputs.write_parquet(root / "train" / f"part-{i:05d}.parquet", pa.table(table))
        start += rows
    eval_table = pa.table({"id": np.arange(len(g_eval)) + 5000, "projections": _matrix(g_eval)})
    outputs.write_parquet(root / "eval" / "part-00000.parquet", eval_table)
    eigvals = rng.uniform(0.5, 2.0, P_TILDE).astype(np.float32)
    return root, g_train, dots, g_eval[:NUM_QUERIES], train_ids, eigvals


@pytest.mark.parametrize("sigma", [None, 0.3])
@pytest.mark.parametrize("block", [1, 4, 1024])
@pytest.mark.parametrize("top_k", [TOP_K, 200])
def test_blocked_streaming_top_k_equals_the_whole_matrix(scores, sigma, block, top_k) -> None:
    root, g_train, dots, g_query, train_ids, eigvals = scores
    queries.trace(root, eigvals, NUM_QUERIES, top_k, sigma, query_block=block)
    got = pd.read_parquet(root / queries.TOPK_FILE)
    plain = np.asarray(scoring.influence(g_train, g_query, eigvals))
    ranked = (
        plain
        if sigma is None
        else np.asarray(scoring.influence(g_train, g_query, eigvals, dots, sigma))
    )
    kept = min(top_k, len(g_train))
    assert len(got) == 2 * NUM_QUERIES * kept
    for kind, sign in queries.KINDS.items():
        for q in range(NUM_QUERIES):
            traced = got[(got.query_id == 5000 + q) & (got.kind == kind)]
            np.testing.assert_array_equal(traced["rank"], np.arange(kept))
            order = np.argsort(-sign * ranked[:, q], kind="stable")[:kept]
            np.testing.assert_array_equal(traced["train_id"], train_ids[order])
            np.testing.assert_allclose(traced["influence"], plain[order, q], rtol=1e-5, atol=1e-6)
            if sigma is not None:
                np.testing.assert_allclose(
                    traced["influence_tail"], ranked[order, q], rtol=1e-5, atol=1e-6
                )
