"""The arnoldi job: Krylov iteration over sharded HVPs (Alg. 1, lines 1–10), checkpointed every k
iterations (and at a preemption) so a killed run resumes, then distillation (lines 11–18) into the
cached eigenpairs G.
"""

from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh

from checkpoints.checkpointer import Checkpointer, UnreadableCheckpointError
from checkpoints.fingerprint import digest, meta_check
from influence import arnoldi, distill
from influence.hvp import make_hvp
from parallel import sharding, steps
from parallel.mesh import make_mesh
from pipeline import data, failpoints, outputs, preemption, train, validate
from pipeline import workdir as wd
from pipeline.errors import InputError
from pipeline.progress import Progress

FIX = "use a new --workdir, or restore the config the saved state was computed with"


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> None:
    mesh = make_mesh(config.mesh.data, config.mesh.model, config.mesh.num_devices)
    validate.check_arnoldi(config, mesh)
    task_data = data.load(config)
    task = task_data.task
    params_like = jax.eval_shape(task.init_params, jax.random.key(0))
    param_sh = sharding.param_shardings(params_like, mesh, config.mesh.min_shard_size)
    params, params_id = train.restore_params(workdir, config, params_like, param_sh)

    eig_fingerprint = wd.eigenpairs_fingerprint(config, params_id)
    eig_ckpt = Checkpointer(wd.path(workdir, wd.EIGENPAIRS), async_save=False)
    try:
        found = _restore_eigenpairs(
            eig_ckpt, eig_fingerprint, config.distill.top_k, params_like, param_sh, mesh
        )
    except UnreadableCheckpointError as e:  # derived data: distill again from the Krylov state
        logging.warning("%s; distilling them again from the Krylov state", e)
        eig_ckpt.quarantine_all()
        found = None
    if found is not None:
        if not wd.path(workdir, wd.EIGENVALUES_JSON).exists():  # killed right after the save
            outputs.write_json(wd.path(workdir, wd.EIGENVALUES_JSON), _summary(found[1]))
        logging.info("eigenpairs already distilled in %s; nothing to do", eig_ckpt.directory)
        eig_ckpt.close()
        return

    a = config.arnoldi
    krylov_fingerprint = wd.krylov_fingerprint(config, params_id)
    ckpt = Checkpointer(wd.path(workdir, wd.KRYLOV), save_interval_steps=a.checkpoint_every)
    init = steps.init_krylov_state(params_like, a.num_iters, param_sh, mesh)
    key = jax.random.key(a.seed)
    found = ckpt.restore_latest(
        sharding.abstract_like(jax.eval_shape(init, key), steps.krylov_shardings(param_sh, mesh)),
        meta_check(krylov_fingerprint, f"the Krylov state in {ckpt.directory}", FIX),
    )
    if found:
        start, state, meta = found
        broke_down = meta["breakdown"]
        logging.info("resuming Arnoldi at iteration %d from %s", start, ckpt.directory)
    else:
        start, state, broke_down = 0, init(key), False
    logging.info(
        "Krylov basis: %d vectors x %d params, %.1f MiB on the most loaded device (mesh %s)",
        a.num_iters + 1,
        sum(x.size for x in jax.tree.leaves(params_like)),
        sharding.bytes_per_device(state["krylov_basis"]) / 2**20,
        dict(mesh.shape),
    )

    train_split = task_data.splits["train"]

    def get_batch(k: int) -> dict:
        positions = data.hvp_batch_indices(
            train_split.num_examples, a.hvp_batch_size, a.seed, k, a.fixed_batch
        )
        return data.global_batch(task, train_split, positions, mesh)

    progress = Progress(workdir, "arnoldi", a.num_iters, config.log_every_secs)

    def on_iteration(done: int, state: arnoldi.KrylovState, info: arnoldi.StepInfo) -> None:
        failpoints.maybe_fail("arnoldi_iteration", done)
        broke = bool(info["breakdown"])
        stop = preemption.reached(done)
        meta = {"fingerprint": krylov_fingerprint, "iteration": done, "breakdown": broke}
        ckpt.save(done, state, meta, force=broke or stop or done == a.num_iters)
        failpoints.maybe_fail("arnoldi_saved", done)  # killed while an async save is in flight
        progress(done, residual_norm=info["residual_norm"], hvp_norm=info["hvp_norm"])
        if stop:
            ckpt.wait_until_finished()
            raise preemption.Preempted(f"Arnoldi preempted; Krylov state saved at iteration {done}")

    num_completed, breakdown = start, "broke down in an earlier run" if broke_down else None
    if start < a.num_iters and not broke_down:
        step_fn = steps.arnoldi_step(
            make_hvp(task.per_example_loss, config.l2),
            param_sh,
            mesh,
            a.breakdown_tol,
            a.orthogonalization,
        )
        result = arnoldi.run_arnoldi(
            step_fn, state, params, get_batch, a.num_iters, start, on_iteration
        )
        state, num_completed, breakdown = result
        if breakdown:
            logging.warning("%s", breakdown)
    ckpt.wait_until_finished()
    ckpt.close()
    progress.close()

    hessenberg = sharding.replicated_to_host(state["hessenberg"])
    d = config.distill
    try:
        pairs = distill.ritz_pairs(hessenberg, num_completed, d.top_k, d.positive_only, d.symmetric)
    except ValueError as e:
        raise InputError(f"distill: {e}") from e
    eigvecs = steps.to_parameter_space(param_sh, mesh)(
        np.asarray(pairs.coords, np.float32), state["krylov_basis"]
    )
    block = hessenberg[:num_completed, :num_completed]
    summary = {
        "eigenpairs_id": digest(eig_fingerprint),
        "eigvals": pairs.eigvals.tolist(),
        "ritz_residuals": pairs.ritz_residuals.tolist(),
        "relative_ritz_residuals": (pairs.ritz_residuals / np.abs(pairs.eigvals)).tolist(),
        "all_ritz_values": np.linalg.eigvalsh(0.5 * (block + block.T)).tolist(),
        "num_iters_completed": num_completed,
        "breakdown": breakdown,
    }
    eig_state = {
        "eigvecs": eigvecs,
        "eigvals": np.asarray(pairs.eigvals, np.float32),
        "ritz_residuals": np.asarray(pairs.ritz_residuals, np.float32),
    }
    eig_ckpt.save(0, eig_state, {"fingerprint": eig_fingerprint, **summary}, force=True)
    eig_ckpt.close()
    outputs.write_json(wd.path(workdir, wd.EIGENVALUES_JSON), summary)
    logging.info(
        "distilled %d eigenpairs: λ = %s; max relative Ritz residual %.2e",
        d.top_k,
        np.array2string(pairs.eigvals[:10], precision=4),
        max(summary["relative_ritz_residuals"]),
    )


def _summary(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "fingerprint"}


def _eigenpairs_abstract(params_like: Any, param_sh: Any, mesh: Mesh, top_k: int) -> dict:
    """Restore target of the eigenpairs: G (p̃, …) sharded like the params, λ replicated."""
    repl = sharding.replicated(mesh)
    return {
        "eigvecs": jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct((top_k, *x.shape), x.dtype, sharding=s),
            params_like,
            sharding.stacked_shardings(param_sh),
        ),
        "eigvals": jax.ShapeDtypeStruct((top_k,), np.float32, sharding=repl),
        "ritz_residuals": jax.ShapeDtypeStruct((top_k,), np.float32, sharding=repl),
    }


def _restore_eigenpairs(
    ckpt: Checkpointer, fingerprint: dict, top_k: int, params_like: Any, param_sh: Any, mesh: Mesh
) -> tuple[dict, dict] | None:
    """(state, meta) of the distilled eigenpairs if present and from this config; raises
    ``UnreadableCheckpointError`` if they exist but cannot be read."""
    found = ckpt.restore_latest(
        _eigenpairs_abstract(params_like, param_sh, mesh, top_k),
        meta_check(fingerprint, f"the eigenpairs in {ckpt.directory}", FIX),
    )
    return None if found is None else (found[1], found[2])


def restore_eigenpairs(
    workdir: epath.PathLike,
    config: ml_collections.ConfigDict,
    params_id: str,
    params_like: Any,
    param_sh: Any,
    mesh: Mesh,
) -> tuple[dict, dict]:
    """The cached eigenpairs (G sharded like the params) and their meta, after checking they come
    from this config; a clear error if they are absent or unreadable."""
    directory = wd.path(workdir, wd.EIGENPAIRS)
    found = None
    if directory.exists():
        with Checkpointer(directory, async_save=False) as ckpt:
            try:
                found = _restore_eigenpairs(
                    ckpt,
                    wd.eigenpairs_fingerprint(config, params_id),
                    config.distill.top_k,
                    params_like,
                    param_sh,
                    mesh,
                )
            except UnreadableCheckpointError as e:
                raise UnreadableCheckpointError(
                    f"{e}; `python -m jobs.arnoldi` with the same --config and --workdir distills "
                    "them again from the Krylov state"
                ) from e
    if found is None:
        raise InputError(
            f"no eigenpairs in {directory}; run `python -m jobs.arnoldi` with the same --config "
            "and --workdir first"
        )
    return found
