"""What the stages save in the workdir and restore from it: trained params, the params kept per
epoch, and any method's fitted artifact (``save_fitted`` / ``find_fitted``, one pair for every
method).

Each restore checks the saved fingerprint against the config first (``checkpoints/fingerprint``)
and puts the arrays straight onto the context's mesh: leaves arrive sharded like the params,
whatever mesh or process count saved them.
"""

from typing import Any

import jax
import numpy as np
from absl import logging

from checkpoints import fingerprint
from checkpoints.checkpointer import Checkpointer, UnreadableCheckpointError
from checkpoints.fingerprint import FIX, meta_check
from methods.base import Context, Fitted
from parallel import offload, sharding, tangent_stream
from runtime import outputs, workdir
from runtime.errors import InputError
from stages.setup import train_fingerprint


def restore_params(ctx: Context) -> tuple[Any, Context]:
    """(params sharded like ``ctx.param_sh``, ``ctx`` with their ``params_id``), after checking
    they come from this config; a clear error naming the job to run when there are none."""
    directory = ctx.workdir / workdir.PARAMS
    found = None
    if directory.exists():
        with Checkpointer(directory, async_save=False) as ckpt:
            found = ckpt.restore_latest(
                sharding.abstract_like({"params": ctx.params_like}, {"params": ctx.param_sh}),
                meta_check(
                    train_fingerprint(ctx),
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
    return state["params"], ctx.with_params_id(meta["params_id"])


def restore_epoch_params(ctx: Context) -> list[tuple[Any, float]]:
    """[(params after epoch e, its learning rate)] for each e of ``train.keep_epochs`` (TracIn's
    checkpoints), sharded like ``ctx.param_sh``, after checking they come from this config; a
    one-line error naming the fix when any is missing."""
    epochs = sorted(ctx.config.train.keep_epochs)
    directory = ctx.workdir / workdir.EPOCH_PARAMS
    fix = (
        f'train with --config.train.keep_epochs="{tuple(epochs)}" in a new --workdir (params '
        "trained without it kept no checkpoints)"
    )
    found = []
    with Checkpointer(directory, max_to_keep=None, async_save=False) as ckpt:
        missing = sorted(set(epochs) - set(ckpt.all_steps()))
        if missing:
            raise InputError(
                f"method.name={ctx.method.name}: no params kept after epochs {missing} in "
                f"{directory}; {fix}"
            )
        target = sharding.abstract_like({"params": ctx.params_like}, {"params": ctx.param_sh})
        check = meta_check(train_fingerprint(ctx), f"the params in {directory}", fix)
        for epoch in epochs:
            state, meta = ckpt.restore(epoch, target)
            check(meta)
            found.append((state["params"], float(meta["learning_rate"])))
    return found


def _target(ctx: Context, host: bool = False) -> dict[str, Any]:
    """Restore target of a fitted artifact: G (k, …) sharded like the (selected) params (in the
    devices' host memory with ``host``: ``score.eigvecs_storage``), λ replicated, k as the method
    says; an operator method's fitted state alone (Orbax saves no empty array), as its
    ``operator_like`` says."""
    if ctx.method.operator_like is not None:
        return {"operator": ctx.method.operator_like(ctx)}
    top_k = ctx.method.vectors(ctx.config, ctx.selection.num_params(ctx.params_like))
    repl = sharding.replicated(ctx.mesh)
    stacked = sharding.stacked_shardings(ctx.vector_sh)
    if host:
        stacked = offload.with_kind(stacked, tangent_stream.host_kind())
    return {
        "eigvecs": jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct((top_k, *x.shape), x.dtype, sharding=s),
            ctx.vectors_like,
            stacked,
        ),
        "eigvals": jax.ShapeDtypeStruct((top_k,), np.float32, sharding=repl),
        "ritz_residuals": jax.ShapeDtypeStruct((top_k,), np.float32, sharding=repl),
    }


def no_eigenpairs(ctx: Context) -> dict[str, Any]:
    """k = 0 eigenpairs laid out like G: what a method without any scores with."""
    return {
        "eigvecs": jax.tree.map(
            lambda x, s: jax.device_put(np.zeros((0, *x.shape), x.dtype), s),
            ctx.vectors_like,
            sharding.stacked_shardings(ctx.vector_sh),
        ),
        "eigvals": jax.device_put(np.zeros(0, np.float32), sharding.replicated(ctx.mesh)),
        "ritz_residuals": np.zeros(0, np.float32),
    }


def save_fitted(ctx: Context, fitted: Fitted) -> dict[str, Any]:
    """Save a method's artifact with its fingerprint in ``<results>/fitted`` and its summary in
    ``fit.json``; returns the summary."""
    expected = ctx.fingerprint(*ctx.method.fingerprint)
    summary = {
        "method": ctx.method.name,
        "fit_id": fingerprint.digest(expected),
        **fitted.summary,
        "influence_over": ctx.selection.describe(ctx.params_like),
    }
    if fitted.operator is not None:  # hyperinf, datainf: their per-layer matrices alone
        state = {"operator": fitted.operator}
    else:
        state = {
            "eigvecs": fitted.eigvecs,
            "eigvals": np.asarray(fitted.eigvals, np.float32),
            "ritz_residuals": np.asarray(fitted.ritz_residuals, np.float32),
        }
    with Checkpointer(ctx.results / workdir.FITTED, async_save=False) as ckpt:
        ckpt.save(0, state, {"fingerprint": expected, **summary}, force=True)
    outputs.write_json(ctx.results / workdir.FIT_JSON, summary)
    return summary


def find_fitted(ctx: Context, host: bool = False) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(state, meta) of the method's artifact if it was fitted for this config, else None; an
    artifact that cannot be read raises ``UnreadableCheckpointError``.

    A method with nothing to fit has its k = 0 eigenpairs at once, and a meta naming its
    fingerprint. A saved artifact whose fit.json is missing (a run killed right after the save)
    gets it written again."""
    expected = ctx.fingerprint(*ctx.method.fingerprint)
    if not ctx.method.saves_fit:
        meta = {"fit_id": fingerprint.digest(expected), "all_ritz_values": [], "eigvals": []}
        return no_eigenpairs(ctx), meta
    directory = ctx.results / workdir.FITTED
    if not directory.exists():
        return None
    with Checkpointer(directory, async_save=False) as ckpt:
        what = f"the fit of {ctx.method.name} in {directory}"
        found = ckpt.restore_latest(_target(ctx, host), meta_check(expected, what, FIX))
    if found is None:
        return None
    _, state, meta = found
    if "eigvecs" not in state:
        state = {**no_eigenpairs(ctx), **state}
    if not (ctx.results / workdir.FIT_JSON).exists():
        outputs.write_json(
            ctx.results / workdir.FIT_JSON, {k: v for k, v in meta.items() if k != "fingerprint"}
        )
    return state, meta


def restore_fitted(ctx: Context, host: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """The method's artifact (G sharded like the params) and its meta, after checking it comes
    from this config; a clear error if it is absent or unreadable."""
    try:
        found = find_fitted(ctx, host)
    except UnreadableCheckpointError as e:
        raise UnreadableCheckpointError(
            f"{e}; `python -m jobs.fit` with the same --config and --workdir fits it again"
        ) from e
    if found is None:
        raise InputError(
            f"no fit of {ctx.method.name} in {ctx.results / workdir.FITTED}; run "
            "`python -m jobs.fit` with the same --config and --workdir first"
        )
    logging.info("%s: restored its fit from %s", ctx.method.name, ctx.results)
    return found
