"""Train the task's model on the (corrupted) training split: the model whose predictions we explain.

Data-parallel over the mesh's 'data' axis; the objective is the mean loss + (l2/2)‖θ‖², the same
objective whose Hessian Arnoldi analyses. Checkpointed every ``train.checkpoint_every`` steps (default:
once per epoch) and at a preemption; resumes mid-epoch; deterministic given the config.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pyarrow as pa
from absl import logging
from etils import epath
from jax.sharding import Mesh

from checkpoints import fingerprint
from checkpoints.checkpointer import Checkpointer
from checkpoints.fingerprint import meta_check
from influence import pytree
from influence.selection import Selection, SelectionError
from methods.base import Context
from parallel import programs, sharding
from runtime import failpoints, finite, outputs, preemption, workdir
from runtime.errors import InputError
from runtime.progress import Progress
from stages import checks
from stages.setup import context, train_fingerprint
from tasks import batching
from tasks.base import Task
from tasks.sources import Source


def evaluate(
    task: Task, params: Any, source: Source, mesh: Mesh, batch_size: int
) -> dict[str, float]:
    """The mean loss and the task's metrics (e.g. accuracy) over ``source``, in sharded global
    batches (each process reads its rows; the last batch is padded and masked)."""
    if source.num_examples == 0:
        return {}

    def sums(params: Any, batch: dict[str, jax.Array], mask: jax.Array) -> dict[str, jax.Array]:
        out = {"loss": jnp.sum(jnp.where(mask, task.per_example_loss(params, batch), 0.0))}
        for k, v in (task.metrics(params, batch) if task.metrics else {}).items():
            counted = mask & jnp.isfinite(v)  # NaN: the metric does not apply to the example
            out[k], out[f"{k} count"] = jnp.sum(jnp.where(counted, v, 0.0)), jnp.sum(counted)
        return out

    total = jax.jit(sums, out_shardings=sharding.replicated(mesh))
    rows = sharding.local_rows(mesh, batch_size)
    result: dict[str, float] = {}
    for positions, mask in batching.padded_batches(0, source.num_examples, batch_size):
        local = task.model_inputs(source.take(positions[rows]))
        batch = sharding.to_global(local, mesh, batch_size)
        real = sharding.to_global({"mask": mask[rows]}, mesh, batch_size)["mask"]
        for k, v in total(params, batch, real).items():
            result[k] = result.get(k, 0.0) + float(v)
    means = {"loss": result["loss"] / source.num_examples}
    for k in result:
        if k != "loss" and not k.endswith(" count") and result[f"{k} count"]:
            means[k] = result[k] / result[f"{k} count"]
    return means


# The input checks of this stage; a job of several stages runs them all before the first.
CHECK = checks.check_train


def run(config: ml_collections.ConfigDict, directory: epath.PathLike) -> None:
    ctx = context(config, directory, CHECK)
    expected = train_fingerprint(ctx)
    fix = "use a new --workdir or restore the original config"
    with Checkpointer(ctx.workdir / workdir.PARAMS, async_save=False) as params_ckpt:
        if params_ckpt.restore_latest(None, meta_check(expected, "the saved params", fix)):
            logging.info("trained params already in %s; nothing to do", params_ckpt.directory)
            return
        params = _train(ctx, expected, fix)
        meta = {"fingerprint": expected, "params_id": fingerprint.digest(expected)}
        for name in ("train", "eval"):  # train: on the labels trained on (corrupted ones included)
            quality = evaluate(ctx.task, params, ctx.split(name), ctx.mesh, config.train.batch_size)
            meta.update({f"{name}_{k}": v for k, v in quality.items()})
        logging.info("trained: %s", meta)
        if ctx.task.corruption_column:
            write_corrupted(ctx.workdir / workdir.CORRUPTED, ctx.task)
        params_ckpt.save(config.train.num_epochs, {"params": params}, meta, force=True)


def objective(task: Task, l2: float, trainable: Selection, state: Selection | None) -> Callable:
    """(θ_T, params, batch) → (mean_i ℓ + (l2/2)‖θ_T‖², params with the state leaves updated): the
    training objective in the trainable leaves, the one whose Hessian Arnoldi analyses (for a
    model with state, the Hessian is of the inference-mode loss at the final statistics)."""

    def fn(theta: Any, params: Any, batch: dict) -> tuple[jax.Array, Any]:
        full = trainable.merge(params, theta)
        if state is None:
            losses, updated = task.per_example_loss(full, batch), full
        else:
            losses, new_state = task.train_loss(full, batch)
            updated = state.merge(full, jax.lax.stop_gradient(new_state))
        loss = losses.mean()
        if l2:
            loss = loss + 0.5 * l2 * pytree.vdot(theta, theta)
        return loss, updated

    return fn


def selections(task: Task, params_like: Any) -> tuple[Selection, Selection | None]:
    """(the leaves the optimizer updates, the state leaves or None)."""
    try:
        trainable = Selection.build(params_like, task.trainable, state=task.state)
    except SelectionError as e:
        raise InputError(f"task {task.name}: Task.trainable: {e}") from e
    state = Selection.build(params_like, task.state) if task.state else None
    return trainable, state


class _Program(NamedTuple):
    """The compiled training step and what its state looks like."""

    init: Callable[[jax.Array], dict[str, Any]]
    state_like: Any
    state_sh: Any
    step: Callable[[dict, dict], tuple[dict, jax.Array]]


def _program(ctx: Context) -> _Program:
    """Adam on the objective of the trainable leaves, its state sharded leaf by leaf."""
    config, task = ctx.config, ctx.task
    optimizer = optax.adam(config.train.learning_rate)
    trainable, state_leaves = selections(task, ctx.params_like)

    def init_state(key: jax.Array) -> dict[str, Any]:
        params = task.init_params(key)
        return {"params": params, "opt_state": optimizer.init(trainable.select(params))}

    # The size rule of the params applies leaf by leaf, so Adam's moments follow their params.
    state_like = jax.eval_shape(init_state, jax.random.key(config.seed))
    state_sh = sharding.param_shardings(state_like, ctx.mesh, config.mesh.min_shard_size)
    step_fn = programs.jit_train_step(
        objective(task, config.l2, trainable, state_leaves),
        optimizer,
        trainable,
        state_sh,
        ctx.mesh,
    )
    return _Program(init_state, state_like, state_sh, step_fn)


def _batch(ctx: Context, step: int, order: np.ndarray, steps_per_epoch: int) -> dict:
    """Training step ``step``'s batch: the examples of its epoch in ``order`` (drawn from (seed,
    epoch)), augmented per example from (seed, step, position) when the task augments."""
    config, task, batch_size = ctx.config, ctx.task, ctx.config.train.batch_size
    i = step % steps_per_epoch
    positions = order[i * batch_size : (i + 1) * batch_size]
    seeds = None
    if task.augment is not None:
        seeds = [np.random.SeedSequence([config.seed, step, int(p)]) for p in positions]
        seeds = np.array([s.generate_state(1, np.uint64)[0] for s in seeds])
    return batching.global_batch(task, ctx.split("train"), positions, ctx.mesh, augment_seeds=seeds)


def _train(ctx: Context, expected: dict, fix: str) -> Any:
    """The optimisation loop, resumed from the latest training checkpoint; returns the params."""
    config, program = ctx.config, _program(ctx)
    num_examples = ctx.split("train").num_examples
    steps_per_epoch = num_examples // config.train.batch_size
    total = config.train.num_epochs * steps_per_epoch
    save_every = config.train.checkpoint_every or steps_per_epoch
    with (
        Checkpointer(ctx.workdir / workdir.TRAIN_STATE, save_interval_steps=save_every) as ckpt,
        Progress(ctx.workdir, "train", total, config.log_every_secs) as progress,
    ):
        found = ckpt.restore_latest(
            sharding.abstract_like(program.state_like, program.state_sh),
            meta_check(expected, "the saved training state", fix),
        )
        if found:
            start, state, _ = found
            logging.info("resuming training at step %d of %d", start, total)
        else:
            start = 0
            key = jax.random.key(config.seed)
            state = jax.jit(program.init, out_shardings=program.state_sh)(key)
        guard = finite.Guard(
            "train",
            "the training loss",
            "lower train.learning_rate, raise l2, or look for non-finite values in the data",
        )
        keep, order = _EpochParams(ctx, expected), None
        for step in range(start, total):
            epoch, i = divmod(step, steps_per_epoch)
            if order is None or i == 0:  # examples of epoch e in the order drawn from (seed, e)
                order = np.random.default_rng([config.seed, epoch]).permutation(num_examples)
            state, loss = program.step(state, _batch(ctx, step, order, steps_per_epoch))
            done = step + 1
            guard.update(done, loss)
            failpoints.maybe_fail("train_step", done)
            stop = ctx.reached_preemption(done)
            force = stop or done == total
            if force or done % save_every == 0:
                guard.check(f"the last checkpoint is of step {max(ckpt.all_steps(), default=0)}")
            if done % steps_per_epoch == 0:  # before the training state: never skipped on resume
                keep(done // steps_per_epoch, state["params"], guard)
            ckpt.save(done, state, {"fingerprint": expected, "step": done}, force=force)
            progress(done, loss=loss)
            if stop:
                ckpt.wait_until_finished()
                raise preemption.Preempted(f"training preempted; state saved at step {done}")
        ckpt.wait_until_finished()
    return state["params"]


class _EpochParams:
    """Keeps the params after each epoch of ``train.keep_epochs`` with the learning rate they
    were trained at (TracIn's checkpoints, ``methods/tracin.py``)."""

    def __init__(self, ctx: Context, fingerprint: dict) -> None:
        self._epochs = set(ctx.config.train.keep_epochs)
        self._path, self._fingerprint = ctx.workdir / workdir.EPOCH_PARAMS, fingerprint
        self._rate = ctx.config.train.learning_rate

    def __call__(self, epoch: int, params: Any, guard: finite.Guard) -> None:
        if epoch not in self._epochs:
            return
        guard.check(f"the params of epochs before {epoch} are kept")
        with Checkpointer(self._path, max_to_keep=None, async_save=False) as ckpt:
            if epoch in ckpt.all_steps():  # saved before a preemption
                return
            meta = {"fingerprint": self._fingerprint, "epoch": epoch, "learning_rate": self._rate}
            ckpt.save(epoch, {"params": params}, meta, force=True)
        logging.info("params after epoch %d kept in %s", epoch, self._path)


def write_corrupted(path: epath.Path, task: Task, chunk: int = 4096) -> None:
    """Record which training examples the task corrupted (id and its ``ground_truth_columns``,
    e.g. the clean and the noisy label), so the ground truth of the retrieval benchmark can be
    read without this project. Process 0 only; reads the split in chunks."""
    if jax.process_index() != 0:
        return
    train, names = task.splits["train"], ("id", *task.ground_truth_columns)
    kept: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for start in range(0, train.num_examples, chunk):
        columns = train.take(np.arange(start, min(start + chunk, train.num_examples)))
        corrupted = np.asarray(columns[task.corruption_column], bool)
        for k in names:
            kept[k].append(columns[k][corrupted])
    table = pa.table({k: np.concatenate(v) for k, v in kept.items()})
    outputs.write_parquet(path, table)
    logging.info("%d corrupted training examples recorded in %s", table.num_rows, path)
