"""The score job: forward-mode projections g = G∇ℓ(x) of every example (Alg. 1, lines 19–27).

Each split is scored in fixed parts of ``score.examples_per_shard`` rows; a part is one Parquet
file, written atomically by the process that scored it, so a restarted job skips finished parts and
the output holds every example exactly once. Parts are dealt to the processes (see
``pipeline/data.py``): each reads and scores only its own examples. Then each of ``score.num_queries`` eval examples is traced back to its
``score.top_k`` strongest training proponents and opponents, streaming over the train parts.
"""

import time

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


def _table(columns: dict[str, np.ndarray], g: np.ndarray, eigvals: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "id": columns["id"],
            "label": columns["label"],
            "flipped": columns["flipped"],
            "self_influence": np.asarray(scoring.self_influence(g, eigvals), np.float32),
            "projections": pa.FixedSizeListArray.from_arrays(
                pa.array(g.reshape(-1), pa.float32()), g.shape[1]
            ),
        }
    )


def _part_path(scores_dir: epath.Path, part: data.Part) -> epath.Path:
    return scores_dir / part.split / f"{part.name}.parquet"


def _remaining_parts(scores_dir: epath.Path, plan: list[data.Part]) -> list[data.Part]:
    """Parts without an output file, as process 0 sees them, identical on every process (files
    appear while other processes are already writing, so each process must not look for itself)."""
    done = np.zeros(len(plan), np.int32)
    if jax.process_index() == 0:
        done[:] = [_part_path(scores_dir, part).exists() for part in plan]
    if jax.process_count() > 1:
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    return [part for part, finished in zip(plan, done, strict=True) if not finished]


def _is_group_leader(group: int) -> bool:
    """Whether this process is the lowest-numbered one of its row group (the one that writes)."""
    if jax.process_count() == 1:
        return True
    groups = np.asarray(multihost_utils.process_allgather(np.asarray([group]))).reshape(-1)
    return int(np.nonzero(groups == group)[0][0]) == jax.process_index()


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
        outputs.write_json(
            scores_dir / META_FILE, {"fingerprint": fingerprint, "eigvals": eigvals.tolist()}
        )

    plan = [
        part
        for name in SPLITS
        for part in data.parts(name, task_data.splits[name].num_examples, s.examples_per_shard)
    ]
    remaining = _remaining_parts(scores_dir, plan)
    rows = sharding.local_rows(mesh, s.batch_size)
    num_groups, group = sharding.row_groups(mesh, s.batch_size)
    writer = _is_group_leader(group)
    batches = data.scoring_plan(remaining, num_groups, group, rows.stop - rows.start)
    logging.info(
        "scoring %d of %d parts in %d steps of %d examples (%d row groups)",
        len(remaining),
        len(plan),
        len(batches),
        s.batch_size,
        num_groups,
    )

    project = steps.projector(task.per_example_loss, param_sh, mesh, s.tangent_chunk or None)
    progress = Progress(workdir, "score", len(batches), config.log_every_secs)
    columns: list[dict[str, np.ndarray]] = []
    projections: list[np.ndarray] = []
    for step, batch in enumerate(batches, start=1):
        source = task_data.splits[batch.part.split if batch.part else "train"]
        read = source.take(batch.positions)
        local = task.model_inputs(read)
        g = project(params, eig_state["eigvecs"], sharding.to_global(local, mesh, s.batch_size))
        if batch.part is not None:
            columns.append({k: read[k][batch.mask] for k in ("id", "label", "flipped")})
            projections.append(sharding.to_host_local(g)[batch.mask])
        if batch.last and writer:
            merged = {k: np.concatenate([c[k] for c in columns]) for k in columns[0]}
            table = _table(merged, np.concatenate(projections), eigvals)
            outputs.write_parquet(_part_path(scores_dir, batch.part), table)
        if batch.last:
            columns, projections = [], []
        progress(step)
        failpoints.maybe_fail("score_batch", step)
        if step == 1:
            jax.block_until_ready(g)
            first_step_done = time.perf_counter()
    progress.close()
    if len(batches) > 1:
        jax.block_until_ready(g)
        # Throughput after the first step (which compiles), all processes together.
        examples = sum(p.stop - p.start for p in remaining) * (len(batches) - 1) / len(batches)
        seconds = time.perf_counter() - first_step_done
        logging.info(
            "scoring throughput: %.1f examples/s (%d processes, %d devices)",
            examples / seconds,
            jax.process_count(),
            jax.device_count(),
        )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("scores written")
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
