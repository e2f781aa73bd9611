"""Train the task's model on the (corrupted) training split: the model whose predictions we explain.

Data-parallel over the mesh's 'data' axis; the objective is the mean loss + (l2/2)‖θ‖², the same
objective whose Hessian Arnoldi analyses. Checkpointed every ``train.checkpoint_every`` steps (default:
once per epoch) and at a preemption; resumes mid-epoch; deterministic given the config.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pyarrow as pa
from absl import logging
from etils import epath
from jax.sharding import Mesh

from checkpoints.checkpointer import Checkpointer
from checkpoints.fingerprint import meta_check
from influence.hvp import make_mean_loss
from parallel import sharding, steps
from pipeline import data, failpoints, outputs, preemption, validate
from pipeline import workdir as wd
from pipeline.progress import Progress
from pipeline.stage import Stage
from tasks.base import ClassificationTask
from tasks.sources import Source


def accuracy(
    task: ClassificationTask, params: Any, source: Source, mesh: Mesh, batch_size: int
) -> float:
    """Top-1 accuracy on ``source``, in sharded global batches (each process reads its rows; the
    last batch is padded and masked)."""
    if source.num_examples == 0:
        return float("nan")

    def num_correct(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        predicted = jnp.argmax(task.logits(params, batch["image"]), axis=-1)
        return jnp.sum((predicted == batch["label"]) & batch["mask"])

    count = jax.jit(num_correct, out_shardings=sharding.replicated(mesh))
    rows = sharding.local_rows(mesh, batch_size)
    correct = 0
    for positions, mask in data.padded_batches(0, source.num_examples, batch_size):
        local = {**task.model_inputs(source.take(positions[rows])), "mask": mask[rows]}
        correct += int(count(params, sharding.to_global(local, mesh, batch_size)))
    return correct / source.num_examples


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> None:
    stage = Stage.setup(config, workdir, validate.check_train)
    fingerprint = wd.train_fingerprint(config)
    fix = "use a new --workdir or restore the original config"
    with Checkpointer(stage.path(wd.PARAMS), async_save=False) as params_ckpt:
        if params_ckpt.restore_latest(None, meta_check(fingerprint, "the saved params", fix)):
            logging.info("trained params already in %s; nothing to do", params_ckpt.directory)
            return
        params = _train(stage, fingerprint, fix)
        meta = {
            "fingerprint": fingerprint,
            "params_id": wd.params_id(config),
            "train_accuracy_noisy_labels": accuracy(
                stage.task, params, stage.split("train"), stage.mesh, config.train.batch_size
            ),
            "eval_accuracy": accuracy(
                stage.task, params, stage.split("eval"), stage.mesh, config.train.batch_size
            ),
        }
        logging.info("trained: %s", meta)
        write_flipped_labels(stage.path(wd.FLIPPED_LABELS), stage.split("train"))
        params_ckpt.save(config.train.num_epochs, {"params": params}, meta, force=True)


def _train(stage: Stage, fingerprint: dict, fix: str) -> Any:
    """The optimisation loop, resumed from the latest training checkpoint; returns the params."""
    config, mesh, task, train = stage.config, stage.mesh, stage.task, stage.split("train")
    optimizer = optax.adam(config.train.learning_rate)

    def init_state(key: jax.Array) -> dict[str, Any]:
        params = task.init_params(key)
        return {"params": params, "opt_state": optimizer.init(params)}

    # The size rule of the params applies leaf by leaf, so Adam's moments follow their params.
    state_like = jax.eval_shape(init_state, jax.random.key(config.seed))
    state_sh = sharding.param_shardings(state_like, mesh, config.mesh.min_shard_size)
    step_fn = steps.jit_train_step(
        make_mean_loss(task.per_example_loss, config.l2), optimizer, state_sh, mesh
    )
    batch_size = config.train.batch_size
    steps_per_epoch = train.num_examples // batch_size
    total = config.train.num_epochs * steps_per_epoch
    with (
        Checkpointer(
            stage.path(wd.TRAIN_STATE),
            save_interval_steps=config.train.checkpoint_every or steps_per_epoch,
        ) as ckpt,
        Progress(stage.workdir, "train", total, config.log_every_secs) as progress,
    ):
        found = ckpt.restore_latest(
            sharding.abstract_like(state_like, state_sh),
            meta_check(fingerprint, "the saved training state", fix),
        )
        if found:
            start, state, _ = found
            logging.info("resuming training at step %d of %d", start, total)
        else:
            start = 0
            state = jax.jit(init_state, out_shardings=state_sh)(jax.random.key(config.seed))
        order = None
        for step in range(start, total):
            epoch, i = divmod(step, steps_per_epoch)
            if order is None or i == 0:  # examples of epoch e in the order drawn from (seed, e)
                order = np.random.default_rng([config.seed, epoch]).permutation(train.num_examples)
            positions = order[i * batch_size : (i + 1) * batch_size]
            state, loss = step_fn(state, data.global_batch(task, train, positions, mesh))
            done = step + 1
            failpoints.maybe_fail("train_step", done)
            stop = preemption.reached(done)
            meta = {"fingerprint": fingerprint, "step": done}
            ckpt.save(done, state, meta, force=stop or done == total)
            progress(done, loss=loss)
            if stop:
                ckpt.wait_until_finished()
                raise preemption.Preempted(f"training preempted; state saved at step {done}")
        ckpt.wait_until_finished()
    return state["params"]


def write_flipped_labels(path: epath.Path, train: Source, chunk: int = 4096) -> None:
    """Record which training labels the corruption flipped (id, clean and noisy label), so the
    ground truth of the §5.1 benchmark can be read without this project. Process 0 only."""
    if jax.process_index() != 0:
        return
    kept: dict[str, list[np.ndarray]] = {"id": [], "clean_label": [], "noisy_label": []}
    for start in range(0, train.num_examples, chunk):
        columns = train.take(np.arange(start, min(start + chunk, train.num_examples)))
        flipped = columns["flipped"]
        kept["id"].append(columns["id"][flipped])
        kept["clean_label"].append(columns["clean_label"][flipped])
        kept["noisy_label"].append(columns["label"][flipped])
    table = pa.table({k: np.concatenate(v) for k, v in kept.items()})
    outputs.write_parquet(path, table)
    logging.info("%d flipped training labels recorded in %s", table.num_rows, path)
