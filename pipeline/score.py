"""The score job: forward-mode projections g = G∇ℓ(x) of every example (Alg. 1, lines 19–27).

Each split is scored in fixed parts of ``score.examples_per_shard`` rows; a part is one Parquet
file, written atomically by the process that scored it, so a restarted job skips finished parts and
the output holds every example exactly once. Parts are dealt to the processes (see
``pipeline/data.py``): each reads and scores only its own examples.

On SIGTERM every process stops at the same step and saves the rows its unfinished part has so far
(``_partial.<part>.parquet``, hidden from readers of the directory); the next run scores only the
rest of that part. Then each of ``score.num_queries`` eval examples is traced back to its
``score.top_k`` strongest training proponents and opponents, streaming over the train parts.
"""

import dataclasses
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
from pipeline import arnoldi, data, failpoints, outputs, preemption, train, validate
from pipeline import workdir as wd
from pipeline.progress import Progress

SPLITS = ("train", "eval")
TOPK_FILE = "influence_topk.parquet"
META_FILE = "meta.json"
COLUMNS = ("id", "label", "flipped")


def _table(columns: dict[str, np.ndarray], g: np.ndarray, eigvals: np.ndarray) -> pa.Table:
    return pa.table(
        {
            **{k: columns[k] for k in COLUMNS},
            "self_influence": np.asarray(scoring.self_influence(g, eigvals), np.float32),
            "projections": pa.FixedSizeListArray.from_arrays(
                pa.array(g.reshape(-1), pa.float32()), g.shape[1]
            ),
        }
    )


def _part_path(scores_dir: epath.Path, part: data.Part) -> epath.Path:
    return scores_dir / part.split / f"{part.name}.parquet"


def _partial_path(scores_dir: epath.Path, part: data.Part) -> epath.Path:
    """Rows of an unfinished part saved at a preemption (a leading '_' hides it from readers)."""
    return scores_dir / part.split / f"_partial.{part.name}.parquet"


def _remaining_parts(scores_dir: epath.Path, plan: list[data.Part]) -> list[data.Part]:
    """Parts without an output file, each with the rows a preempted run already saved, as process 0
    sees them and identical on every process (files appear while other processes are writing, so
    each process must not look for itself)."""
    done = np.zeros(len(plan), np.int64)  # -1: finished; else rows saved in a partial file
    if jax.process_index() == 0:
        for i, part in enumerate(plan):
            partial = _partial_path(scores_dir, part)
            if _part_path(scores_dir, part).exists():
                done[i] = -1
                if partial.exists():  # the run stopped between writing the part and this cleanup
                    partial.unlink()
            elif partial.exists():
                done[i] = outputs.read_parquet(partial).num_rows
                if done[i] == part.stop - part.start:  # complete, only not renamed yet
                    partial.rename(_part_path(scores_dir, part))
                    done[i] = -1
    if jax.process_count() > 1:
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    return [
        dataclasses.replace(part, done=int(rows))
        for part, rows in zip(plan, done, strict=True)
        if rows >= 0
    ]


def _is_group_leader(group: int) -> bool:
    """Whether this process is the lowest-numbered one of its row group (the one that writes)."""
    if jax.process_count() == 1:
        return True
    groups = np.asarray(multihost_utils.process_allgather(np.asarray([group]))).reshape(-1)
    return int(np.nonzero(groups == group)[0][0]) == jax.process_index()


class _PartWriter:
    """Collects one part's rows as they are scored; writes the part, or its partial at a stop."""

    def __init__(self, scores_dir: epath.Path, eigvals: np.ndarray, enabled: bool):
        self._dir, self._eigvals, self._enabled = scores_dir, eigvals, enabled
        self._part: data.Part | None = None
        self._columns: list[dict[str, np.ndarray]] = []
        self._projections: list[np.ndarray] = []

    def add(self, part: data.Part, columns: dict[str, np.ndarray], g: np.ndarray) -> None:
        if part != self._part:
            self._part, self._columns, self._projections = part, [], []
        self._columns.append(columns)
        self._projections.append(g)

    def _merged(self) -> pa.Table:
        merged = {k: np.concatenate([c[k] for c in self._columns]) for k in COLUMNS}
        table = _table(merged, np.concatenate(self._projections), self._eigvals)
        if self._part.done:  # rows scored before a preemption come first
            saved = outputs.read_parquet(_partial_path(self._dir, self._part))
            table = pa.concat_tables([saved, table.cast(saved.schema)])
        return table

    def finish(self) -> None:
        """The part is complete: write it atomically, then drop its partial file."""
        if self._enabled:
            outputs.write_parquet(_part_path(self._dir, self._part), self._merged())
            partial = _partial_path(self._dir, self._part)
            if self._part.done and partial.exists():
                partial.unlink()
        self._part = None

    def save_partial(self) -> None:
        """Preempted mid-part: keep the rows scored so far, to continue from there."""
        if self._enabled and self._part is not None and self._columns:
            outputs.write_parquet(_partial_path(self._dir, self._part), self._merged())


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> None:
    mesh = make_mesh(config.mesh.data, config.mesh.model, config.mesh.num_devices)
    validate.check_score(config, mesh)
    s = config.score
    task_data = data.load(config)
    task = task_data.task
    params_like = jax.eval_shape(task.init_params, jax.random.key(0))
    param_sh = sharding.param_shardings(params_like, mesh, config.mesh.min_shard_size)
    params, params_id = train.restore_params(workdir, config, params_like, param_sh)
    eig_state, eig_meta = arnoldi.restore_eigenpairs(
        workdir, config, params_id, params_like, param_sh, mesh
    )
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
    writer = _PartWriter(scores_dir, eigvals, enabled=_is_group_leader(group))
    batches = data.scoring_plan(remaining, num_groups, group, rows.stop - rows.start)
    logging.info(
        "scoring %d of %d parts (%d resumed) in %d steps of %d examples (%d row groups)",
        len(remaining),
        len(plan),
        sum(1 for p in remaining if p.done),
        len(batches),
        s.batch_size,
        num_groups,
    )

    project = steps.projector(task.per_example_loss, param_sh, mesh, s.tangent_chunk or None)
    progress = Progress(workdir, "score", len(batches), config.log_every_secs)
    first_step_done = 0.0
    for step, batch in enumerate(batches, start=1):
        source = task_data.splits[batch.part.split if batch.part else "train"]
        read = source.take(batch.positions)
        local = task.model_inputs(read)
        g = project(params, eig_state["eigvecs"], sharding.to_global(local, mesh, s.batch_size))
        if batch.part is not None:
            columns = {k: read[k][batch.mask] for k in COLUMNS}
            writer.add(batch.part, columns, sharding.to_host_local(g)[batch.mask])
            if batch.last:
                writer.finish()
        progress(step)
        failpoints.maybe_fail("score_batch", step)
        if preemption.reached(step):
            writer.save_partial()
            raise preemption.Preempted(f"scoring preempted at step {step}; finished parts kept")
        if step == 1:
            jax.block_until_ready(g)
            first_step_done = time.perf_counter()
    progress.close()
    if len(batches) > 1:
        # Throughput after the first step (which compiles), all processes together.
        jax.block_until_ready(g)
        scored = sum(p.stop - p.start - p.done for p in remaining)
        logging.info(
            "scoring throughput: %.1f examples/s (%d processes, %d devices)",
            scored * (len(batches) - 1) / len(batches) / (time.perf_counter() - first_step_done),
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
