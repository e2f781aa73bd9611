"""The score job: projections g = G∇ℓ(x) of every example (Alg. 1, lines 19–27), in forward or
reverse mode as ``score.mode`` says (``parallel/products.py`` sizes and, under auto, times them).

Each split is scored in fixed parts of ``score.examples_per_shard`` rows (``scoring/parts.py``:
one Parquet file each, the unit of resumption). Parts are dealt to the processes' row groups
(``scoring/schedule.py``): each reads and scores only its own examples. The loop keeps the device
busy: Grain threads read and decode the next ``score.read_ahead`` batches (``runtime/prefetch.py``),
and batch i + 1 is dispatched before the projections of batch i are fetched to the host and
written.

With ``distill.tail`` each row also gets ‖∇ℓ(x)‖² (one more column of the projector) and, for
train → test, its products with the query gradients ∇ℓ(z), computed once here and appended to G
as extra tangents (forward) or GEMM columns (reverse); ``scoring/row_layout.py`` derives the tail
columns from them.

On SIGTERM every process stops at the same step and saves the rows its unfinished part has so far;
the next run scores only the rest of that part. Then each of ``score.num_queries`` eval examples
is traced back to its ``score.top_k`` strongest training proponents and opponents, streaming over
the train parts (``scoring/queries.py``).
"""

import time

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from checkpoints.fingerprint import check
from influence import scoring
from parallel import products, sharding
from runtime import failpoints, finite, outputs, preemption, prefetch
from runtime.errors import InputError
from runtime.progress import Progress
from scoring import parts, queries, schedule, tangents
from stages import artifacts, checks
from stages import workdir as wd
from stages.setup import Stage

SPLITS = ("train", "eval")
TOPK_FILE = queries.TOPK_FILE


# The input checks of this stage; a job of several stages runs them all before the first.
CHECK = checks.check_score


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> None:
    stage = Stage.setup(config, workdir, CHECK)
    s, d = config.score, config.distill
    params, params_id = artifacts.restore_params(stage)
    eig_state, eig_meta = artifacts.restore_eigenpairs(stage, params_id)
    eigvals = sharding.replicated_to_host(eig_state["eigvals"]) + np.float32(d.damping)
    # σ of the method itself (graddot: H = I) makes the plain scores; else distill.tail's σ
    # adds the *_tail columns beside them.
    intrinsic = stage.method.sigma is not None
    try:
        sigma = (
            stage.method.sigma
            if intrinsic
            else scoring.tail_sigma(
                d.tail,
                l2=config.l2,
                damping=d.damping,
                ritz_values=eig_meta.get("all_ritz_values", []),
                top_k=eigvals.size,
            )
        )
    except ValueError as e:
        raise InputError(str(e)) from e
    layout = tangents.layout(stage, eigvals.size, sigma, intrinsic)

    scores_dir = stage.path(wd.SCORES)
    fingerprint = wd.scores_fingerprint(config, eig_meta["eigenpairs_id"])
    has_meta = stage.path(wd.SCORES_META).exists()
    if has_meta:
        saved = outputs.read_json(stage.path(wd.SCORES_META))["fingerprint"]
        check(saved, fingerprint, f"the scores in {scores_dir}", artifacts.FIX)

    plan = [
        part
        for name in SPLITS
        for part in parts.parts(name, stage.split(name).num_examples, s.examples_per_shard)
    ]
    remaining = parts.remaining(scores_dir, plan)
    rows = sharding.local_rows(stage.mesh, s.batch_size)
    num_groups, group, leader = sharding.row_groups(stage.mesh, s.batch_size)
    writer = parts.PartWriter(scores_dir, eigvals, layout, enabled=leader)
    batches = schedule.scoring_plan(remaining, num_groups, group, rows.size)
    logging.info(
        "scoring %d of %d parts (%d resumed) in %d steps of %d examples (%d row groups)",
        len(remaining),
        len(plan),
        sum(1 for p in remaining if p.done),
        len(batches),
        s.batch_size,
        num_groups,
    )
    # The tangents first (an operator's own checks, e.g. LiSSA's damping, may stop the job), then
    # the scores' fingerprint: a run stopped before any scoring leaves nothing to refuse a fix.
    weighted, operator = (
        tangents.build(stage, params, eig_state, eigvals, layout) if len(batches) else ([], None)
    )
    if not has_meta:
        meta = {
            "fingerprint": fingerprint,
            "eigvals": eigvals.tolist(),
            "method": stage.method.name,
            "tail_sigma": layout.sigma,
            "intrinsic_sigma": layout.intrinsic,
            "task": stage.task.name,
            "corruption_column": stage.task.corruption_column,
        }
        outputs.write_json(stage.path(wd.SCORES_META), meta)
    project = tangents.projector(stage, operator, layout, len(batches))

    def read(step: int) -> tuple[schedule.LocalBatch, dict]:
        """Host work of one step (in a prefetch thread): its rows, read and decoded."""
        batch = batches[step]
        return batch, stage.split(batch.part.split if batch.part else "train").take(batch.positions)

    def score(
        step: int, batch: schedule.LocalBatch, read: dict
    ) -> tuple[int, schedule.LocalBatch, dict, products.Projected]:
        """Dispatch one batch to the devices (returns before they are done)."""
        inputs = stage.task.model_inputs(read)
        projected = [(project(at, vectors, inputs), w) for at, vectors, w in weighted]
        return step, batch, read, products.Weighted.of(projected)

    def collect(step: int, batch: schedule.LocalBatch, read: dict, g: products.Projected) -> None:
        """Fetch a dispatched batch's projections (waits for it) and hand them to the writer,
        after checking the whole global batch is finite (the same answer on every process)."""
        if not g.all_finite():
            raise finite.NonFiniteError(
                f"score step {step}: a projection g = G∇ℓ(x) is NaN or infinite; it was not "
                "saved (parts finished before it are kept): check the trained params, the "
                "eigenpairs and the data for non-finite values"
            )
        if batch.part is not None:
            columns = {k: read[k][batch.mask] for k in output_columns}
            writer.add(batch.part, columns, g.local()[batch.mask])
            if batch.last:
                writer.finish()

    output_columns = stage.task.output_columns()
    first_step_done, pending = 0.0, None
    with Progress(stage.workdir, "score", len(batches), config.log_every_secs) as progress:
        reads = prefetch.ahead(read, 0, len(batches), s.read_threads, s.read_ahead)
        for step, (batch, rows) in enumerate(reads, start=1):
            current = score(step, batch, rows)
            if pending is not None:
                collect(*pending)
            pending = current
            progress(step)
            failpoints.maybe_fail("score_batch", step)
            if preemption.reached(step):
                collect(*pending)
                writer.save_partial()
                raise preemption.Preempted(f"scoring preempted at step {step}; finished parts kept")
            if step == 1:
                current[3].wait()
                first_step_done = time.perf_counter()
        if pending is not None:
            collect(*pending)
    if len(batches) > 1:  # throughput after the first step (which compiles), all processes
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
        queries.trace(
            scores_dir,
            eigvals,
            s.num_queries,
            s.top_k,
            layout.sigma,
            s.query_block,
            layout.intrinsic,
        )
