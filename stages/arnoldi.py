"""The arnoldi job: Krylov iteration over sharded HVPs (Alg. 1, lines 1–10), checkpointed every k
iterations (and at a preemption) so a killed run resumes, then distillation (lines 11–18) into the
cached eigenpairs G.

Three steps, each its own function: reuse finished eigenpairs (``_eigenpairs_done``), run or
resume the iteration (``iterate``), distill and save (``distill_and_save``).
"""

from typing import Any

import jax
import numpy as np
from absl import logging

from checkpoints.checkpointer import Checkpointer, UnreadableCheckpointError
from checkpoints.fingerprint import digest, meta_check
from influence import distill, krylov
from influence.hvp import make_hvp
from methods import arnoldi as arnoldi_method
from parallel import programs, sharding
from runtime import failpoints, finite, outputs, preemption
from runtime.errors import InputError
from runtime.progress import Progress
from stages import artifacts
from stages import workdir as wd
from stages.setup import Stage
from tasks import batching

# The input checks of this stage; a job of several stages runs them all before the first.
CHECK = arnoldi_method.check


def run(config, workdir) -> None:
    stage = Stage.setup(config, workdir, CHECK)
    params, params_id = artifacts.restore_params(stage)
    with Checkpointer(stage.path(wd.EIGENPAIRS), async_save=False) as eig_ckpt:
        if _eigenpairs_done(eig_ckpt, stage, params_id):
            return
        result = iterate(stage, params, params_id)
        distill_and_save(stage, eig_ckpt, result, params_id)


def _eigenpairs_done(eig_ckpt: Checkpointer, stage: Stage, params_id: str) -> bool:
    """Whether this config's eigenpairs are already distilled (then nothing is left to do).
    Unreadable ones are derived data: they are moved aside and distilled again."""
    try:
        found = artifacts.find_eigenpairs(eig_ckpt, stage, params_id)
    except UnreadableCheckpointError as e:
        logging.warning("%s; distilling them again from the Krylov state", e)
        eig_ckpt.quarantine_all()
        return False
    if found is None:
        return False
    if not stage.path(wd.EIGENVALUES_JSON).exists():  # killed right after the save
        outputs.write_json(stage.path(wd.EIGENVALUES_JSON), _summary(found[1]))
    logging.info("eigenpairs already distilled in %s; nothing to do", eig_ckpt.directory)
    return True


def _summary(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "fingerprint"}


def iterate(stage: Stage, params: Any, params_id: str) -> krylov.ArnoldiResult:
    """Alg. 1 lines 1–10 from the latest Krylov checkpoint (or from q_0), saving every
    ``krylov.checkpoint_every`` iterations, at the last one and at a preemption."""
    config, mesh, a = stage.config, stage.mesh, stage.config.arnoldi
    fingerprint = wd.krylov_fingerprint(config, params_id, stage.selection)
    init = programs.jit_init_krylov_state(stage.vectors_like, a.num_iters, stage.vector_sh, mesh)
    key = jax.random.key(a.seed)
    with Checkpointer(stage.path(wd.KRYLOV), save_interval_steps=a.checkpoint_every) as ckpt:
        found = ckpt.restore_latest(
            sharding.abstract_like(
                jax.eval_shape(init, key), programs.krylov_shardings(stage.vector_sh, mesh)
            ),
            meta_check(fingerprint, f"the Krylov state in {ckpt.directory}", artifacts.FIX),
        )
        start, state = (found[0], found[1]) if found else (0, init(key))
        if found:
            logging.info("resuming Arnoldi at iteration %d from %s", start, ckpt.directory)
            hessenberg = sharding.replicated_to_host(state["hessenberg"])
            completed = krylov.completed_iterations(hessenberg, start)
            if completed < start:
                return krylov.ArnoldiResult(state, completed, "broke down in an earlier run")
        logging.info("influence over %s", stage.selection.describe(stage.params_like))
        logging.info(
            "Krylov basis: %d vectors x %d params, %.1f MiB on the most loaded device (mesh %s)",
            a.num_iters + 1,
            sum(x.size for x in jax.tree.leaves(stage.vectors_like)),
            sharding.bytes_per_device(state["krylov_basis"]) / 2**20,
            dict(mesh.shape),
        )
        if start == a.num_iters:
            return krylov.ArnoldiResult(state, start, None)

        train_split = stage.split("train")
        saved = {"step": start}

        def get_batch(k: int) -> dict:
            positions = batching.hvp_batch_indices(
                train_split.num_examples, a.hvp_batch_size, a.seed, k, a.fixed_batch
            )
            return batching.global_batch(stage.task, train_split, positions, mesh)

        guard = finite.Guard(
            "arnoldi",
            "the HVP norm",
            "check the trained params and the data for non-finite values",
        )

        def save(done: int, state: krylov.KrylovState, force: bool) -> None:
            if force or done % a.checkpoint_every == 0:
                guard.check(f"the last Krylov state is of iteration {saved['step']}")
            meta = {"fingerprint": fingerprint, "iteration": done}
            if ckpt.save(done, state, meta, force=force):
                saved["step"] = done

        with Progress(stage.workdir, "arnoldi", a.num_iters, config.log_every_secs) as progress:

            def on_iteration(done: int, state: krylov.KrylovState, info: krylov.StepInfo):
                guard.update(done, info["hvp_norm"])
                failpoints.maybe_fail("arnoldi_iteration", done)
                stop = preemption.reached(done)
                save(done, state, force=stop or done == a.num_iters)
                failpoints.maybe_fail("arnoldi_saved", done)  # killed while a save is in flight
                progress(done, residual_norm=info["residual_norm"], hvp_norm=info["hvp_norm"])
                if stop:
                    ckpt.wait_until_finished()
                    raise preemption.Preempted(
                        f"Arnoldi preempted; Krylov state saved at iteration {done}"
                    )

            step_fn = programs.jit_arnoldi_step(
                make_hvp(stage.task.per_example_loss, config.l2, stage.selection),
                stage.param_sh,
                stage.vector_sh,
                mesh,
                a.breakdown_tol,
                a.orthogonalization,
            )
            logging.info("running Arnoldi iterations %d to %d", start + 1, a.num_iters)
            result = krylov.run_arnoldi(
                step_fn, state, params, get_batch, a.num_iters, start, on_iteration
            )
        if result.breakdown:
            logging.warning("%s", result.breakdown)
            if saved["step"] != result.num_completed:  # learnt one step late: save it now
                save(result.num_completed, result.state, force=True)
        ckpt.wait_until_finished()
    return result


def distill_and_save(
    stage: Stage, eig_ckpt: Checkpointer, result: krylov.ArnoldiResult, params_id: str
) -> None:
    """Alg. 1 lines 11–18: the top-p̃ Ritz pairs, G = Uᵀ Q sharded like the params, saved with
    their fingerprint; eigenvalues.json for people."""
    d = stage.config.distill
    eig_fingerprint = wd.eigenpairs_fingerprint(stage.config, params_id, stage.selection)
    hessenberg = sharding.replicated_to_host(result.state["hessenberg"])
    m = result.num_completed
    try:
        pairs = distill.ritz_pairs(hessenberg, m, d.top_k, d.positive_only, d.symmetric)
    except ValueError as e:
        raise InputError(f"distill: {e}") from e
    eigvecs = programs.jit_to_parameter_space(stage.vector_sh, stage.mesh)(
        np.asarray(pairs.coords, np.float32), result.state["krylov_basis"]
    )
    block = hessenberg[:m, :m]
    ritz_values = np.linalg.eigvalsh(0.5 * (block + block.T))
    summary = {
        "eigenpairs_id": digest(eig_fingerprint),
        "eigvals": pairs.eigvals.tolist(),
        "ritz_residuals": pairs.ritz_residuals.tolist(),
        "relative_ritz_residuals": (pairs.ritz_residuals / np.abs(pairs.eigvals)).tolist(),
        "all_ritz_values": ritz_values.tolist(),
        "negative_mass_fraction": negative_mass_fraction(ritz_values, d.top_k),
        "num_iters_completed": m,
        "breakdown": result.breakdown,
        "influence_over": stage.selection.describe(stage.params_like),
    }
    eig_state = {
        "eigvecs": eigvecs,
        "eigvals": np.asarray(pairs.eigvals, np.float32),
        "ritz_residuals": np.asarray(pairs.ritz_residuals, np.float32),
    }
    eig_ckpt.save(0, eig_state, {"fingerprint": eig_fingerprint, **summary}, force=True)
    outputs.write_json(stage.path(wd.EIGENVALUES_JSON), summary)
    logging.info(
        "distilled %d eigenpairs: λ = %s; max relative Ritz residual %.2e; %.1f%% of the top-%d "
        "|λ| mass is negative",
        d.top_k,
        np.array2string(pairs.eigvals[:10], precision=4),
        max(summary["relative_ritz_residuals"]),
        100 * summary["negative_mass_fraction"],
        d.top_k,
    )


def negative_mass_fraction(ritz_values: np.ndarray, top_k: int) -> float:
    """Σ|λ| over the negative of the top-p̃ Ritz values by |λ|, over Σ|λ| of all of them: how far
    from a minimum the trained params are (the paper's fine-tuned ViT-L/32: 7% of the top-100
    mass negative, a saddle point, hence ``distill.positive_only``; Schioppa et al. 2022, §5.3)."""
    top = ritz_values[np.argsort(-np.abs(ritz_values))[:top_k]]
    total = float(np.abs(top).sum())
    return float(np.abs(top[top < 0]).sum() / total) if total > 0 else 0.0
