"""Train the task's model on the (corrupted) training split: the model whose predictions we explain.

Data-parallel over the mesh's 'data' axis; the objective is the mean loss + (l2/2)‖θ‖², the same
objective whose Hessian Arnoldi analyses. Resumable per epoch; deterministic given the config.
"""

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from checkpoints.checkpointer import Checkpointer
from checkpoints.fingerprint import check
from influence.hvp import make_mean_loss
from parallel import sharding
from parallel.mesh import make_mesh
from pipeline import data, validate
from pipeline import workdir as wd
from pipeline.errors import InputError
from pipeline.progress import Progress


def accuracy(task, params, split: dict[str, np.ndarray], batch_size: int = 1000) -> float:
    logits_fn = jax.jit(task.logits)
    correct = 0
    for start in range(0, split["label"].size, batch_size):
        logits = logits_fn(params, split["image"][start : start + batch_size])
        correct += int(
            (np.asarray(logits).argmax(-1) == split["label"][start : start + batch_size]).sum()
        )
    return correct / max(split["label"].size, 1)


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> None:
    mesh = make_mesh(config.mesh.data, config.mesh.model, config.mesh.num_devices)
    validate.check_train(config, mesh)
    fingerprint = wd.train_fingerprint(config)
    fix = "use a new --workdir or restore the original config"
    params_ckpt = Checkpointer(wd.path(workdir, wd.PARAMS), async_save=False)
    if (step := params_ckpt.latest_step()) is not None:
        check(params_ckpt.restore_meta(step)["fingerprint"], fingerprint, "the saved params", fix)
        logging.info("trained params already in %s; nothing to do", params_ckpt.directory)
        params_ckpt.close()
        return

    task_data = data.load(config)
    task, train = task_data.task, task_data.splits["train"]
    inputs = task.model_inputs(train)
    params = task.init_params(jax.random.key(config.seed))
    param_sh = sharding.param_shardings(params, mesh, config.mesh.min_shard_size)
    params = jax.device_put(params, param_sh)
    optimizer = optax.adam(config.train.learning_rate)
    state = {"params": params, "opt_state": optimizer.init(params)}
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    loss_fn = make_mean_loss(task.per_example_loss, config.l2)

    def train_step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
        }, loss

    step_fn = jax.jit(
        train_step,
        in_shardings=(state_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    steps_per_epoch = train["label"].size // config.train.batch_size
    ckpt = Checkpointer(wd.path(workdir, wd.TRAIN_STATE))
    start_epoch = 0
    if (epoch := ckpt.latest_step()) is not None:
        check(ckpt.restore_meta(epoch)["fingerprint"], fingerprint, "the saved training state", fix)
        state, _ = ckpt.restore(epoch, sharding.abstract_like(state, state_sh))
        start_epoch = epoch
        logging.info("resuming training after epoch %d", epoch)
    progress = Progress(
        workdir, "train", config.train.num_epochs * steps_per_epoch, config.log_every_secs
    )
    for epoch in range(start_epoch, config.train.num_epochs):
        order = np.random.default_rng([config.seed, epoch]).permutation(train["label"].size)
        for i in range(steps_per_epoch):
            indices = order[i * config.train.batch_size : (i + 1) * config.train.batch_size]
            state, loss = step_fn(state, data.global_batch(inputs, indices, mesh))
            progress(epoch * steps_per_epoch + i + 1, loss=loss)
        ckpt.save(epoch + 1, state, {"fingerprint": fingerprint, "epoch": epoch + 1})
    ckpt.wait_until_finished()
    ckpt.close()
    progress.close()

    params = state["params"]
    meta = {
        "fingerprint": fingerprint,
        "params_id": wd.params_id(config),
        "train_accuracy_noisy_labels": accuracy(task, params, train),
        "eval_accuracy": accuracy(task, params, task_data.splits["eval"]),
    }
    logging.info("trained: %s", meta)
    params_ckpt.save(config.train.num_epochs, {"params": params}, meta, force=True)
    params_ckpt.close()


def restore_params(
    workdir: epath.PathLike, config: ml_collections.ConfigDict, params_like, param_sh
) -> tuple[dict, str]:
    """The trained params onto ``param_sh``, after checking they come from this config."""
    directory = wd.path(workdir, wd.PARAMS)
    ckpt = Checkpointer(directory, async_save=False) if directory.exists() else None
    step = ckpt.latest_step() if ckpt else None
    if step is None:
        raise InputError(
            f"no trained params in {directory}; run `python -m jobs.train` with the same --config "
            "and --workdir first"
        )
    meta = ckpt.restore_meta(step)
    check(
        meta["fingerprint"],
        wd.train_fingerprint(config),
        f"the params in {directory}",
        "train them with this config in a new --workdir, or restore the original config",
    )
    abstract = sharding.abstract_like({"params": params_like}, {"params": param_sh})
    state, meta = ckpt.restore(step, abstract)
    ckpt.close()
    return state["params"], meta["params_id"]
