"""The score job: forward-mode projections g = G∇ℓ(x) of every example (Alg. 1, lines 19–27).

Each split is scored in fixed parts of ``score.examples_per_shard`` rows; a part is one Parquet
file, written atomically, so a restarted job skips finished parts and the output holds every
example exactly once. Then each of ``score.num_queries`` eval examples is traced back to its
``score.top_k`` strongest training proponents and opponents, streaming over the train parts.
"""

import jax
import ml_collections
import numpy as np
import pyarrow as pa
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from checkpoints.fingerprint import check
from influence import scoring
from parallel import sharding, steps
from parallel.mesh import make_mesh
from pipeline import arnoldi, data, failpoints, outputs, train, validate
from pipeline import workdir as wd
from pipeline.progress import Progress

SPLITS = ("train", "eval")
TOPK_FILE = "influence_topk.parquet"
META_FILE = "meta.json"


def _table(
    split: dict[str, np.ndarray], rows: np.ndarray, g: np.ndarray, eigvals: np.ndarray
) -> pa.Table:
    columns = {
        "id": split["id"][rows],
        "label": split["label"][rows],
        "flipped": split["flipped"][rows],
        "self_influence": np.asarray(scoring.self_influence(g, eigvals), np.float32),
        "projections": pa.FixedSizeListArray.from_arrays(
            pa.array(g.reshape(-1), pa.float32()), g.shape[1]
        ),
    }
    return pa.table(columns)


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> None:
    mesh = make_mesh(config.mesh.data, config.mesh.model, config.mesh.num_devices)
    validate.check_score(config, mesh)
    s = config.score
    task_data = data.load(config)
    task = task_data.task
    params_like = jax.eval_shape(task.init_params, jax.random.key(0))
    param_sh = sharding.param_shardings(params_like, mesh, config.mesh.min_shard_size)
    params, _ = train.restore_params(workdir, config, params_like, param_sh)
    eig_state, eig_meta = arnoldi.restore_eigenpairs(workdir, params_like, param_sh, mesh)
    eigvals = sharding.replicated_to_host(eig_state["eigvals"])

    scores_dir = wd.path(workdir, wd.SCORES)
    fingerprint = wd.scores_fingerprint(config, eig_meta["eigenpairs_id"])
    if (scores_dir / META_FILE).exists():
        saved = outputs.read_json(scores_dir / META_FILE)["fingerprint"]
        check(saved, fingerprint, f"the scores in {scores_dir}", arnoldi.FIX)
    else:
        scores_dir.mkdir(parents=True, exist_ok=True)
        outputs.write_json(
            scores_dir / META_FILE, {"fingerprint": fingerprint, "eigvals": eigvals.tolist()}
        )

    project = steps.projector(task.per_example_loss, param_sh, mesh, s.tangent_chunk or None)
    plan = {
        name: data.parts(task_data.splits[name]["label"].size, s.examples_per_shard)
        for name in SPLITS
    }
    total = sum(-(-(p.stop - p.start) // s.batch_size) for parts in plan.values() for p in parts)
    progress = Progress(workdir, "score", total, config.log_every_secs)
    done_batches = 0
    for name in SPLITS:
        split = task_data.splits[name]
        inputs = task.model_inputs(split)
        for part in plan[name]:
            out = scores_dir / name / f"{part.name}.parquet"
            num_batches = -(-(part.stop - part.start) // s.batch_size)
            if out.exists():
                done_batches += num_batches
                continue
            rows, projections = [], []
            for batch, batch_rows, mask in data.part_batches(inputs, part, s.batch_size):
                local = {k: v[sharding.process_rows(s.batch_size)] for k, v in batch.items()}
                g = project(params, eig_state["eigvecs"], sharding.to_global(local, mesh))
                g = np.asarray(multihost_utils.process_allgather(g, tiled=True))
                rows.append(batch_rows[mask])
                projections.append(g[mask])
                done_batches += 1
                progress(done_batches)
                failpoints.maybe_fail("score_batch", done_batches)
            if jax.process_index() == 0:
                g_part = np.concatenate(projections)
                outputs.write_parquet(out, _table(split, np.concatenate(rows), g_part, eigvals))
            multihost_utils.sync_global_devices(f"score {name} {part.name}")
    progress.close()
    if s.num_queries and jax.process_index() == 0 and not (scores_dir / TOPK_FILE).exists():
        trace_queries(scores_dir, eigvals, s.num_queries, s.top_k)


def _projections(table: pa.Table) -> np.ndarray:
    column = table.column("projections").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1).astype(np.float32)


def trace_queries(
    scores_dir: epath.Path, eigvals: np.ndarray, num_queries: int, top_k: int
) -> None:
    """The ``top_k`` strongest training proponents and opponents of the first ``num_queries`` eval
    examples (Alg. 1, line 26), merged part by part so the train projections never need to fit in
    memory at once."""
    queries = outputs.read_parquet_dir(scores_dir / "eval")
    queries = queries.slice(0, min(num_queries, queries.num_rows))
    g_query, query_ids = _projections(queries), queries.column("id").to_numpy()
    records: dict[str, list] = {
        k: [] for k in ("query_id", "kind", "rank", "train_id", "influence")
    }
    for kind, sign in (("proponent", 1.0), ("opponent", -1.0)):
        best = np.empty((0, len(query_ids)), np.float32)
        best_ids = np.empty((0, len(query_ids)), np.int64)
        for file in sorted((scores_dir / "train").glob("part-*.parquet")):
            part = outputs.read_parquet(file)
            values = sign * np.asarray(scoring.influence(_projections(part), g_query, eigvals))
            ids = np.broadcast_to(part.column("id").to_numpy()[:, None], values.shape)
            candidates = np.concatenate([best, values])
            candidate_ids = np.concatenate([best_ids, ids])
            keep, _ = scoring.top_influential(candidates, min(top_k, len(candidates)))
            best = np.take_along_axis(candidates, np.asarray(keep).T, axis=0)
            best_ids = np.take_along_axis(candidate_ids, np.asarray(keep).T, axis=0)
        for q, query_id in enumerate(query_ids):
            for rank in range(best.shape[0]):
                records["query_id"].append(query_id)
                records["kind"].append(kind)
                records["rank"].append(rank)
                records["train_id"].append(best_ids[rank, q])
                records["influence"].append(sign * best[rank, q])
    outputs.write_parquet(scores_dir / TOPK_FILE, pa.table(records))
    logging.info("traced %d queries to their top-%d training examples", len(query_ids), top_k)
