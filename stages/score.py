"""The score job: projections g = G∇ℓ(x) of every example (Alg. 1, lines 19–27), in forward or
reverse mode as ``score.mode`` says (``parallel/products.py`` sizes and, under auto, times them).

Each split is scored in fixed parts of ``score.examples_per_shard`` rows (``scoring/parts.py``:
one Parquet file each, the unit of resumption). Parts are dealt to the processes' row groups
(``scoring/schedule.py``): each reads and scores only its own examples. The loop keeps the device
busy: Grain threads read and decode the next ``score.read_ahead`` batches (``runtime/prefetch.py``),
and batch i + 1 is dispatched before the projections of batch i are fetched to the host and
written.

With ``distill.tail`` each row also gets ‖∇ℓ(x)‖² (one more column of the products program) and, for
train → test, its products with the query gradients ∇ℓ(z), computed once here and appended to G
as extra tangents (forward) or GEMM columns (reverse); ``scoring/row_layout.py`` derives the tail
columns from them.

On SIGTERM every process stops at the same step and saves the rows its unfinished part has so far;
the next run scores only the rest of that part. Then each of ``score.num_queries`` eval examples
is traced back to its ``score.top_k`` strongest training proponents and opponents, streaming over
the train parts (``scoring/queries.py``).
"""

import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from checkpoints import fingerprint
from methods.base import Context
from parallel import products, sharding
from runtime import failpoints, finite, outputs, preemption, prefetch, workdir
from scoring import parts, queries, row_layout, schedule, tangents
from stages import artifacts, blocks, checks
from stages.setup import context

SPLITS = ("train", "eval")
TOPK_FILE = queries.TOPK_FILE

# The input checks of this stage; a job of several stages runs them all before the first.
CHECK = checks.check_score


def run(config: ml_collections.ConfigDict, directory: epath.PathLike) -> None:
    ctx = context(config, directory, CHECK)
    params, ctx = artifacts.restore_params(ctx)
    where = tangents.storage(ctx)
    eig_state, eig_meta = artifacts.restore_fitted(ctx, host=where == "host")
    eigvals = sharding.replicated_to_host(eig_state["eigvals"]) + np.float32(config.distill.damping)
    layout = _layout(ctx, eigvals, eig_meta)
    scores_dir = ctx.results / workdir.SCORES
    expected = fingerprint.scores(config, eig_meta["fit_id"], blocks.SCORES_FINGERPRINT)
    has_meta = _check_saved(ctx, expected)
    plan, remaining, writer = _plan(ctx, scores_dir, eigvals, layout)
    # The tangents first (an operator's own checks, e.g. LiSSA's damping, may stop the job), then
    # the scores' meta: a run stopped before any scoring leaves nothing to refuse a fix.
    weighted, operator = [], None
    if len(plan):
        models = artifacts.restore_epoch_params(ctx) if ctx.method.checkpoints else [(params, 1.0)]
        weighted, operator = tangents.build(ctx, models, eig_state, eigvals, layout, where)
    del eig_state  # G lives on in the tangents (host: as their chunks)
    if not has_meta:
        _write_meta(ctx, expected, eigvals, layout)
    program = tangents.program(ctx, operator, layout, len(plan), where)
    seconds = _Loop(ctx, plan, weighted, program, writer).run()
    if len(plan) > 1:  # throughput after the first step (which compiles), all processes
        scored = sum(p.stop - p.start - p.done for p in remaining)
        logging.info(
            "scoring throughput: %.1f examples/s (%d processes, %d devices)",
            scored * (len(plan) - 1) / len(plan) / seconds,
            jax.process_count(),
            jax.device_count(),
        )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("scores written")
    s = config.score
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


def _layout(ctx: Context, eigvals: np.ndarray, eig_meta: dict[str, Any]) -> row_layout.Layout:
    """The rows' layout: σ of the method itself (graddot: H = I) makes the plain scores; else
    distill.tail's σ adds the *_tail columns beside them."""
    sigma, intrinsic = tangents.method_sigma(ctx, eigvals, eig_meta)
    return tangents.layout(ctx, eigvals.size, sigma, intrinsic)


def _check_saved(ctx: Context, expected: dict[str, Any]) -> bool:
    """Whether scores were begun already (then for this config: else a one-line error)."""
    meta = ctx.results / workdir.SCORES_META
    if not meta.exists():
        return False
    saved = outputs.read_json(meta)["fingerprint"]
    fingerprint.check(saved, expected, f"the scores in {meta.parent}", fingerprint.FIX)
    return True


def _write_meta(
    ctx: Context, expected: dict[str, Any], eigvals: np.ndarray, layout: row_layout.Layout
) -> None:
    meta = {
        "fingerprint": expected,
        "eigvals": eigvals.tolist(),
        "method": ctx.method.name,
        "tail_sigma": layout.sigma,
        "intrinsic_sigma": layout.intrinsic,
        "task": ctx.task.name,
        "corruption_column": ctx.task.corruption_column,
        "relevance_column": ctx.task.relevance_column,
    }
    outputs.write_json(ctx.results / workdir.SCORES_META, meta)


def _plan(
    ctx: Context, scores_dir: epath.Path, eigvals: np.ndarray, layout: row_layout.Layout
) -> tuple[schedule.ScoringPlan, list[parts.Part], parts.PartWriter]:
    """(this process' steps, the parts not finished yet, the writer of its row group's parts)."""
    s = ctx.config.score
    every = [
        part
        for name in SPLITS
        for part in parts.parts(name, ctx.split(name).num_examples, s.examples_per_shard)
    ]
    remaining = parts.remaining(scores_dir, every)
    rows = sharding.local_rows(ctx.mesh, s.batch_size)
    num_groups, group, leader = sharding.row_groups(ctx.mesh, s.batch_size)
    writer = parts.PartWriter(scores_dir, eigvals, layout, enabled=leader)
    plan = schedule.scoring_plan(remaining, num_groups, group, rows.size)
    logging.info(
        "scoring %d of %d parts (%d resumed) in %d steps of %d examples (%d row groups)",
        len(remaining),
        len(every),
        sum(1 for p in remaining if p.done),
        len(plan),
        s.batch_size,
        num_groups,
    )
    return plan, remaining, writer


class _Loop:
    """The scoring loop: Grain threads read and decode the next ``score.read_ahead`` batches
    (``runtime/prefetch.py``), and batch i + 1 is dispatched before the products of batch i are
    fetched to the host and written; at a preemption every process saves the rows of its
    unfinished part and stops."""

    def __init__(
        self,
        ctx: Context,
        plan: schedule.ScoringPlan,
        weighted: list[tuple[Any, Any, float]],
        program: Any,
        writer: parts.PartWriter,
    ) -> None:
        self._ctx, self._plan, self._weighted = ctx, plan, weighted
        self._program, self._writer = program, writer
        self._columns = ctx.task.output_columns()

    def _read(self, step: int) -> tuple[schedule.LocalBatch, dict]:
        """Host work of one step (in a prefetch thread): its rows, read and decoded."""
        batch = self._plan[step]
        split = batch.part.split if batch.part else "train"
        return batch, self._ctx.split(split).take(batch.positions)

    def _dispatch(self, step: int, batch: schedule.LocalBatch, read: dict) -> tuple:
        """Dispatch one batch to the devices (returns before they are done)."""
        inputs = self._ctx.task.model_inputs(read)
        rows = [(self._program(at, vectors, inputs), w) for at, vectors, w in self._weighted]
        return step, batch, read, products.Weighted.of(rows)

    def _collect(self, step: int, batch: schedule.LocalBatch, read: dict, g: products.Rows) -> None:
        """Fetch a dispatched batch's products (waits for it) and hand them to the writer, after
        checking the whole global batch is finite (the same answer on every process)."""
        if not g.all_finite():
            raise finite.NonFiniteError(
                f"score step {step}: a projection g = G∇ℓ(x) is NaN or infinite; it was not "
                "saved (parts finished before it are kept): check the trained params, the "
                "eigenpairs and the data for non-finite values"
            )
        if batch.part is not None:
            columns = {k: read[k][batch.mask] for k in self._columns}
            self._writer.add(batch.part, columns, g.local()[batch.mask])
            if batch.last:
                self._writer.finish()

    def run(self) -> float:
        """Score every step; returns the seconds since the first step was done."""
        s, num_steps = self._ctx.config.score, len(self._plan)
        first_step_done, pending = time.perf_counter(), None
        with self._ctx.progress("score", num_steps) as progress:
            reads = prefetch.ahead(self._read, 0, num_steps, s.read_threads, s.read_ahead)
            for step, (batch, read) in enumerate(reads, start=1):
                current = self._dispatch(step, batch, read)
                if pending is not None:
                    self._collect(*pending)
                pending = current
                progress(step)
                failpoints.maybe_fail("score_batch", step)
                if self._ctx.reached_preemption(step):
                    self._collect(*pending)
                    self._writer.save_partial()
                    raise preemption.Preempted(
                        f"scoring preempted at step {step}; finished parts kept"
                    )
                if step == 1:
                    current[3].wait()
                    first_step_done = time.perf_counter()
            if pending is not None:
                self._collect(*pending)
        return time.perf_counter() - first_step_done
