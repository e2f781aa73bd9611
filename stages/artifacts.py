"""Restoring what earlier stages saved in the workdir: trained params and distilled eigenpairs.

One place for every stage that consumes them (arnoldi, score, the tests), so no job imports
another. Each restore checks the saved fingerprint against the config first
(``checkpoints.fingerprint``) and puts the arrays straight onto the Stage's mesh: leaves arrive
sharded like the params, whatever mesh or process count saved them.
"""

from typing import Any

import jax
import numpy as np

from checkpoints.checkpointer import Checkpointer, UnreadableCheckpointError
from checkpoints.fingerprint import digest, meta_check
from parallel import sharding
from runtime.errors import InputError
from stages import workdir as wd
from stages.setup import Stage

FIX = "use a new --workdir, or restore the config the saved state was computed with"


def restore_params(stage: Stage) -> tuple[Any, str]:
    """(params sharded like ``stage.param_sh``, params_id), after checking they come from this
    config; a clear error naming the job to run when there are none."""
    directory = stage.path(wd.PARAMS)
    found = None
    if directory.exists():
        with Checkpointer(directory, async_save=False) as ckpt:
            found = ckpt.restore_latest(
                sharding.abstract_like({"params": stage.params_like}, {"params": stage.param_sh}),
                meta_check(
                    stage.train_fingerprint,
                    f"the params in {directory}",
                    "train them with this config in a new --workdir, or restore the original config",
                ),
            )
    if found is None:
        raise InputError(
            f"no trained params in {directory}; run `python -m jobs.train` with the same --config "
            "and --workdir first"
        )
    _, state, meta = found
    return state["params"], meta["params_id"]


def eigenpairs_target(stage: Stage) -> dict[str, Any]:
    """Restore target of the eigenpairs: G (k, …) sharded like the (selected) params, λ
    replicated; k as the method says (p̃; every param for exact). An ``Operator`` method has no
    eigenpairs (Orbax saves no empty array): its target is its fitted state alone, as its
    ``operator_like`` says."""
    if stage.method.operator_like is not None:
        return {"operator": stage.method.operator_like(stage)}
    top_k = stage.method.num_vectors(stage.config, stage.selection.num_params(stage.params_like))
    repl = sharding.replicated(stage.mesh)
    return {
        "eigvecs": jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct((top_k, *x.shape), x.dtype, sharding=s),
            stage.vectors_like,
            sharding.stacked_shardings(stage.vector_sh),
        ),
        "eigvals": jax.ShapeDtypeStruct((top_k,), np.float32, sharding=repl),
        "ritz_residuals": jax.ShapeDtypeStruct((top_k,), np.float32, sharding=repl),
    }


def no_eigenpairs(stage: Stage) -> dict[str, Any]:
    """k = 0 eigenpairs laid out like G: what a method without any scores with."""
    return {
        "eigvecs": jax.tree.map(
            lambda x, s: jax.device_put(np.zeros((0, *x.shape), x.dtype), s),
            stage.vectors_like,
            sharding.stacked_shardings(stage.vector_sh),
        ),
        "eigvals": jax.device_put(np.zeros(0, np.float32), sharding.replicated(stage.mesh)),
        "ritz_residuals": np.zeros(0, np.float32),
    }


def find_eigenpairs(
    ckpt: Checkpointer, stage: Stage, params_id: str
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(state, meta) of the eigenpairs in ``ckpt`` if present and from this config; raises
    ``UnreadableCheckpointError`` if they exist but cannot be read."""
    found = ckpt.restore_latest(
        eigenpairs_target(stage),
        meta_check(
            wd.fit_fingerprint(stage.config, params_id, stage.selection, stage.method),
            f"the eigenpairs in {ckpt.directory}",
            FIX,
        ),
    )
    if found is None:
        return None
    state = found[1] if "eigvecs" in found[1] else {**no_eigenpairs(stage), **found[1]}
    return state, found[2]


def restore_eigenpairs(stage: Stage, params_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The cached eigenpairs (G sharded like the params) and their meta, after checking they come
    from this config; a clear error if they are absent or unreadable. A method with nothing to
    fit (graddot) has none: k = 0 eigenvectors."""
    if stage.method.fit is None and stage.method.stage is None:
        own = {"method": stage.method.name, **stage.method.fingerprint(stage.config)}
        meta = {"eigenpairs_id": digest(own), "all_ritz_values": [], "eigvals": []}
        return no_eigenpairs(stage), meta
    job = "jobs.arnoldi" if stage.method.name == "arnoldi" else "jobs.fit"
    directory = stage.path(wd.EIGENPAIRS)
    found = None
    if directory.exists():
        with Checkpointer(directory, async_save=False) as ckpt:
            try:
                found = find_eigenpairs(ckpt, stage, params_id)
            except UnreadableCheckpointError as e:
                raise UnreadableCheckpointError(
                    f"{e}; `python -m {job}` with the same --config and --workdir "
                    + (
                        "distills them again from the Krylov state"
                        if job == "jobs.arnoldi"
                        else "fits them again"
                    )
                ) from e
    if found is None:
        raise InputError(
            f"no eigenpairs in {directory}; run `python -m {job}` with the same --config "
            "and --workdir first"
        )
    return found


def restore_epoch_params(stage: Stage) -> list[tuple[Any, float]]:
    """[(params after epoch e, its learning rate)] for each e of ``train.keep_epochs`` (TracIn's
    checkpoints), sharded like ``stage.param_sh``, after checking they come from this config; a
    one-line error naming the fix when any is missing."""
    epochs = sorted(stage.config.train.keep_epochs)
    directory = stage.path(wd.EPOCH_PARAMS)
    fix = (
        f'train with --config.train.keep_epochs="{tuple(epochs)}" in a new --workdir (params '
        "trained without it kept no checkpoints)"
    )
    found = []
    with Checkpointer(directory, max_to_keep=None, async_save=False) as ckpt:
        missing = sorted(set(epochs) - set(ckpt.all_steps()))
        if missing:
            raise InputError(
                f"method.name={stage.method.name}: no params kept after epochs {missing} in "
                f"{directory}; {fix}"
            )
        target = sharding.abstract_like({"params": stage.params_like}, {"params": stage.param_sh})
        check = meta_check(stage.train_fingerprint, f"the params in {directory}", fix)
        for epoch in epochs:
            state, meta = ckpt.restore(epoch, target)
            check(meta)
            found.append((state["params"], float(meta["learning_rate"])))
    return found
