"""The arnoldi job: Krylov iteration over sharded HVPs (Alg. 1, lines 1–10), checkpointed every k
iterations so a killed run resumes, then distillation (lines 11–18) into the cached eigenpairs G.
"""

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from checkpoints.checkpointer import Checkpointer
from checkpoints.fingerprint import check, digest
from influence import arnoldi, distill
from influence.hvp import make_hvp
from parallel import sharding, steps
from parallel.mesh import make_mesh
from pipeline import data, failpoints, outputs, train, validate
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
    if (step := eig_ckpt.latest_step()) is not None:
        meta = eig_ckpt.restore_meta(step)
        check(
            meta.pop("fingerprint"), eig_fingerprint, f"the eigenpairs in {eig_ckpt.directory}", FIX
        )
        if not wd.path(workdir, wd.EIGENVALUES_JSON).exists():  # killed right after the save
            outputs.write_json(wd.path(workdir, wd.EIGENVALUES_JSON), meta)
        logging.info("eigenpairs already distilled in %s; nothing to do", eig_ckpt.directory)
        eig_ckpt.close()
        return

    a = config.arnoldi
    krylov_fingerprint = wd.krylov_fingerprint(config, params_id)
    ckpt = Checkpointer(wd.path(workdir, wd.KRYLOV), save_interval_steps=a.checkpoint_every)
    init = steps.init_krylov_state(params_like, a.num_iters, param_sh, mesh)
    key = jax.random.key(a.seed)
    start, broke_down = 0, False
    if (step := ckpt.latest_step()) is not None:
        saved = ckpt.restore_meta(step)["fingerprint"]
        check(saved, krylov_fingerprint, f"the Krylov state in {ckpt.directory}", FIX)
        abstract = sharding.abstract_like(
            jax.eval_shape(init, key), steps.krylov_shardings(param_sh, mesh)
        )
        state, meta = ckpt.restore(step, abstract)
        start, broke_down = meta["iteration"], meta["breakdown"]
        logging.info("resuming Arnoldi at iteration %d from %s", start, ckpt.directory)
    else:
        state = init(key)
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
        broke = bool(info["breakdown"])
        meta = {"fingerprint": krylov_fingerprint, "iteration": done, "breakdown": broke}
        ckpt.save(done, state, meta, force=broke or done == a.num_iters)
        progress(done, residual_norm=info["residual_norm"], hvp_norm=info["hvp_norm"])
        failpoints.maybe_fail("arnoldi_iteration", done)

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


def restore_eigenpairs(workdir: epath.PathLike, params_like, param_sh, mesh) -> tuple[dict, dict]:
    """The cached eigenpairs (G sharded like the params) and their meta; a clear error if absent."""
    directory = wd.path(workdir, wd.EIGENPAIRS)
    ckpt = Checkpointer(directory, async_save=False) if directory.exists() else None
    step = ckpt.latest_step() if ckpt else None
    if step is None:
        raise InputError(
            f"no eigenpairs in {directory}; run `python -m jobs.arnoldi` with the same --config "
            "and --workdir first"
        )
    meta = ckpt.restore_meta(step)
    top_k = len(meta["eigvals"])
    eig_sh = sharding.stacked_shardings(param_sh)
    repl = sharding.replicated(mesh)
    abstract = {
        "eigvecs": jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct((top_k, *x.shape), x.dtype, sharding=s),
            params_like,
            eig_sh,
        ),
        "eigvals": jax.ShapeDtypeStruct((top_k,), np.float32, sharding=repl),
        "ritz_residuals": jax.ShapeDtypeStruct((top_k,), np.float32, sharding=repl),
    }
    state, meta = ckpt.restore(step, abstract)
    ckpt.close()
    return state, meta
