"""Arnoldi (Schioppa et al. 2022, Algorithm 1): the top-p̃ eigenpairs of H from n Krylov
iterations over HVPs, H⁻¹ ≈ Gᵀ diag(1/λ) G.

Its fit is the iteration (Alg. 1, lines 1–10) over sharded HVPs, checkpointed every
``arnoldi.checkpoint_every`` iterations and at a preemption in ``<results>/krylov`` (so a killed
run resumes from its last Krylov state, on any mesh), then distillation (lines 11–18): the top-p̃
Ritz pairs of the Hessenberg matrix mapped back to parameter space once, G = Uᵀ Q. The Krylov
state does not depend on ``distill.*``: one Krylov run serves every p̃ (the report's sweep).
"""

from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from checkpoints.fingerprint import FIX, meta_check
from checkpoints.pieces import Pieces
from influence import distill, krylov
from influence.hvp import make_hvp
from methods import basis_storage, checks
from methods.base import Context, Fitted, Kind, Method, fitted
from parallel import offload, programs, sharding
from runtime import failpoints, finite, preemption
from runtime.config import Block
from runtime.errors import InputError

KRYLOV = "krylov"

ARNOLDI_BLOCK = Block(
    "arnoldi",
    {
        "num_iters": 100,  # n, Arnoldi iterations (Alg. 1)
        "hvp_batch_size": 512,  # b, examples per HVP (global)
        "fixed_batch": False,  # True: every HVP on the same batch (exact Krylov space)
        "seed": 0,  # start vector and HVP batch draws
        "breakdown_tol": 1e-4,  # ‖w‖/‖Hq‖ below this: invariant subspace, stop early
        # Gram–Schmidt: "mgs2" or "cgs2" (twice), "dgks" (MGS, second pass when needed)
        "orthogonalization": "mgs2",
        "checkpoint_every": 10,  # save the Krylov state every k iterations
        # Storage of the basis: "float32", or "bfloat16" (half the memory; every dot product and
        # update still accumulates in float32)
        "basis_dtype": "float32",
        # Where the basis lives: "device", "host" (host memory), "disk" (the workdir) or "auto"
        # (as much on the devices as memory_budget_mb allows, the rest in host memory); all but
        # "device" stream it in blocks and need orthogonalization="bcgs2"
        "basis_storage": "device",
        "block_rows": 8,  # rows per block of bcgs2 and of a transfer from host or disk
        "memory_budget_mb": 0.0,  # "auto": device memory for the basis (0: half the free memory)
    },
)
DISTILL_BLOCK = Block(
    "distill",
    {
        "top_k": 20,  # p̃, eigenpairs kept
        "positive_only": False,  # keep the p̃ largest positive λ instead of largest |λ|
        "symmetric": True,  # eigh of the symmetrised Hessenberg block (else general eig)
    },
)
# What the Krylov state depends on (beyond the params, the selection and l2).
KRYLOV_FIELDS = (
    "arnoldi.num_iters",
    "arnoldi.hvp_batch_size",
    "arnoldi.fixed_batch",
    "arnoldi.seed",
    "arnoldi.breakdown_tol",
    "arnoldi.orthogonalization",
    "arnoldi.basis_dtype",
    "arnoldi.block_rows",
)
BASIS_DTYPES = ("float32", "bfloat16")
DISTILL_FIELDS = ("distill.top_k", "distill.positive_only", "distill.symmetric")


def check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    a, d = config.arnoldi, config.distill
    if a.num_iters < 1:
        raise InputError(f"arnoldi.num_iters={a.num_iters} must be at least 1")
    if not 1 <= d.top_k <= a.num_iters:
        raise InputError(
            f"distill.top_k={d.top_k} must be between 1 and arnoldi.num_iters={a.num_iters} "
            "(p̃ ≤ n: Arnoldi yields at most n eigenpairs); lower top_k or raise num_iters"
        )
    checks.hvp_batch(config, mesh)
    if a.orthogonalization not in krylov.ORTHOGONALIZATION:
        raise InputError(
            f"arnoldi.orthogonalization={a.orthogonalization!r}; choose one of "
            f"{sorted(krylov.ORTHOGONALIZATION)}"
        )
    if a.checkpoint_every < 1:
        raise InputError(f"arnoldi.checkpoint_every={a.checkpoint_every} must be at least 1")
    if a.basis_dtype not in BASIS_DTYPES:
        raise InputError(f"arnoldi.basis_dtype={a.basis_dtype!r}; choose one of {BASIS_DTYPES}")
    if a.basis_dtype != "float32" and (why := offload.dtype_unsupported(a.basis_dtype)):
        raise InputError(
            f"arnoldi.basis_dtype={a.basis_dtype}: the {jax.default_backend()} backend cannot "
            f"store the basis in it ({why}); use arnoldi.basis_dtype=float32"
        )
    basis_storage.check(a)


def fit(ctx: Context, params: Any) -> Fitted:
    """Run or resume the iteration, then distill its eigenpairs."""
    storage = basis_storage.make(ctx)
    try:
        return distill_pairs(ctx, iterate(ctx, params, storage), storage)
    finally:
        storage.close()


def _restore(
    ctx: Context, pieces: Pieces, storage: basis_storage.Storage
) -> tuple[int, krylov.KrylovState]:
    """(iterations done, state) assembled from the Krylov pieces of this config, or (0, q_0)."""
    state = {"state": storage.init(jax.random.key(ctx.config.arnoldi.seed))}
    shardings = programs.krylov_shardings(ctx.vector_sh, ctx.mesh)

    def abstract(meta: dict[str, Any]) -> krylov.KrylovState:
        rows, columns = meta["rows"], meta["columns"]
        size = (rows[1] - rows[0], columns[1] - columns[0])
        return sharding.abstract_like(_piece_like(ctx, *size), shardings)

    def consume(meta: dict[str, Any], piece: krylov.KrylovState) -> None:
        state["state"] = storage.write(state["state"], piece, meta["rows"][0], meta["columns"][0])

    what = f"the Krylov state in {pieces.checkpointer.directory}"
    check = meta_check(ctx.fingerprint(*KRYLOV_FIELDS), what, FIX)
    done = pieces.restore(check, abstract, consume)
    if done:
        logging.info(
            "resuming Arnoldi at iteration %d from %s", done, pieces.checkpointer.directory
        )
    return done, state["state"]


def saved_state(ctx: Context) -> tuple[int, krylov.KrylovState]:
    """(iterations done, Krylov state) as saved in the method's results (0: none saved), the
    basis on the devices whatever ``arnoldi.basis_storage`` says."""
    with ctx.checkpointer(KRYLOV, max_to_keep=None) as ckpt:
        return _restore(ctx, Pieces(ckpt), basis_storage.make(ctx, "device"))


def _piece_like(ctx: Context, rows: int, columns: int) -> krylov.KrylovState:
    """The shapes of a piece of ``rows`` basis vectors and ``columns`` Hessenberg columns."""
    a = ctx.config.arnoldi
    return krylov.KrylovState(
        krylov_basis=jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((rows, *x.shape), a.basis_dtype), ctx.vectors_like
        ),
        hessenberg=jax.ShapeDtypeStruct((a.num_iters + 1, columns), np.float32),
    )


def _piece_bounds(previous: int, done: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(rows, columns), half-open, that iterations previous + 1 … done added to the state:
    basis vectors q_{previous+1} … q_done (q_0 too in the first piece) and Hessenberg columns
    previous … done − 1 (Alg. 1, lines 8–9: iteration k fills column k − 1 and writes q_k)."""
    return (previous + 1 if previous else 0, done + 1), (previous, done)


def iterate(ctx: Context, params: Any, storage: basis_storage.Storage) -> krylov.ArnoldiResult:
    """Alg. 1 lines 1–10 from the latest Krylov checkpoint (or from q_0), saving every
    ``arnoldi.checkpoint_every`` iterations, at the last one and at a preemption."""
    a = ctx.config.arnoldi
    with ctx.checkpointer(KRYLOV, max_to_keep=None) as ckpt:
        pieces = Pieces(ckpt)
        start, state = _restore(ctx, pieces, storage)
        if start:
            hessenberg = sharding.replicated_to_host(state["hessenberg"])
            completed = krylov.completed_iterations(hessenberg, start)
            if completed < start:
                return krylov.ArnoldiResult(state, completed, "broke down in an earlier run")
        logging.info("influence over %s", ctx.selection.describe(ctx.params_like))
        logging.info(
            "Krylov basis: %d vectors x %d params in %s, %s (basis_storage=%s, mesh %s)",
            a.num_iters + 1,
            sum(x.size for x in jax.tree.leaves(ctx.vectors_like)),
            a.basis_dtype,
            storage.describe(state),
            a.basis_storage,
            dict(ctx.mesh.shape),
        )
        if start == a.num_iters:
            return krylov.ArnoldiResult(state, start, None)
        result = _loop(ctx, params, pieces, start, state, storage)
        ckpt.wait_until_finished()
    return result


def _loop(
    ctx: Context,
    params: Any,
    pieces: Pieces,
    start: int,
    state: krylov.KrylovState,
    storage: basis_storage.Storage,
) -> krylov.ArnoldiResult:
    """Iterations start + 1 … n, each followed by a save when due (the piece since the last
    save: ``checkpoints/pieces.py``); a preemption saves and stops."""
    a, ckpt = ctx.config.arnoldi, pieces.checkpointer
    fingerprint = ctx.fingerprint(*KRYLOV_FIELDS)
    guard = finite.Guard(
        "arnoldi", "the HVP norm", "check the trained params and the data for non-finite values"
    )

    def save(done: int, state: krylov.KrylovState, force: bool) -> None:
        if not (force or done % a.checkpoint_every == 0) or done == pieces.last:
            return
        guard.check(f"the last Krylov state is of iteration {pieces.last}")
        rows, columns = _piece_bounds(pieces.last, done)
        meta = {"fingerprint": fingerprint, "iteration": done, "rows": rows, "columns": columns}
        pieces.save(done, storage.take(state, rows, columns), meta)

    with ctx.progress("arnoldi", a.num_iters) as progress:

        def on_iteration(done: int, state: krylov.KrylovState, info: krylov.StepInfo) -> None:
            guard.update(done, info["hvp_norm"])
            failpoints.maybe_fail("arnoldi_iteration", done)
            stop = ctx.reached_preemption(done)
            save(done, state, force=stop or done == a.num_iters)
            failpoints.maybe_fail("arnoldi_saved", done)  # killed while a save is in flight
            progress(done, residual_norm=info["residual_norm"], hvp_norm=info["hvp_norm"])
            if stop:
                ckpt.wait_until_finished()
                raise preemption.Preempted(
                    f"Arnoldi preempted; Krylov state saved at iteration {done}"
                )

        step_fn = storage.step(
            make_hvp(ctx.task.per_example_loss, ctx.config.l2, ctx.selection),
            ctx.param_sh,
            a.breakdown_tol,
            a.orthogonalization,
            a.block_rows,
        )
        logging.info("running Arnoldi iterations %d to %d", start + 1, a.num_iters)
        result = krylov.run_arnoldi(
            step_fn,
            state,
            params,
            lambda k: ctx.hvp_batch(a.seed, k),
            a.num_iters,
            start,
            on_iteration,
        )
    if result.breakdown:
        logging.warning("%s", result.breakdown)
        save(result.num_completed, result.state, force=True)  # learnt one step late
    return result


def distill_pairs(
    ctx: Context, result: krylov.ArnoldiResult, storage: basis_storage.Storage
) -> Fitted:
    """Alg. 1 lines 11–18: the top-p̃ Ritz pairs, G = Uᵀ Q sharded like the params."""
    d = ctx.config.distill
    hessenberg = sharding.replicated_to_host(result.state["hessenberg"])
    m = result.num_completed
    try:
        pairs = distill.ritz_pairs(hessenberg, m, d.top_k, d.positive_only, d.symmetric)
    except ValueError as e:
        raise InputError(f"distill: {e}") from e
    eigvecs = storage.to_parameter_space(np.asarray(pairs.coords, np.float32), result.state)
    block = hessenberg[:m, :m]
    ritz_values = np.linalg.eigvalsh(0.5 * (block + block.T))
    negative = negative_mass_fraction(ritz_values, d.top_k)
    logging.info(
        "distilled %d eigenpairs: λ = %s; max relative Ritz residual %.2e; %.1f%% of the top-%d "
        "|λ| mass is negative",
        d.top_k,
        np.array2string(pairs.eigvals[:10], precision=4),
        float(np.max(pairs.ritz_residuals / np.abs(pairs.eigvals))),
        100 * negative,
        d.top_k,
    )
    return fitted(
        eigvecs,
        pairs.eigvals,
        pairs.ritz_residuals,
        num_hvps=m,
        all_ritz_values=ritz_values.tolist(),
        negative_mass_fraction=negative,
        num_iters_completed=m,
        breakdown=result.breakdown,
    )


def negative_mass_fraction(ritz_values: np.ndarray, top_k: int) -> float:
    """Σ|λ| over the negative of the top-p̃ Ritz values by |λ|, over Σ|λ| of all of them: how far
    from a minimum the trained params are (the paper's fine-tuned ViT-L/32: 7% of the top-100
    mass negative, a saddle point, hence ``distill.positive_only``; Schioppa et al. 2022, §5.3)."""
    top = ritz_values[np.argsort(-np.abs(ritz_values))[:top_k]]
    total = float(np.abs(top).sum())
    return float(np.abs(top[top < 0]).sum() / total) if total > 0 else 0.0


def advice(
    config: ml_collections.ConfigDict, converged: int, kept: int, move: float | None
) -> list[str]:
    """What the fit was, and what to raise when the kept Ritz pairs have not converged or move
    between seeds."""
    a = config.arnoldi
    batches = "one fixed batch" if a.fixed_batch else "a fresh batch per HVP"
    words = [f"Arnoldi ran n = {a.num_iters} iterations, b = {a.hvp_batch_size}, {batches}."]
    if converged < kept / 2:
        words.append(
            f"Fewer than half converged: raise arnoldi.num_iters (n = {a.num_iters}); the "
            "unconverged pairs mix eigenvectors and their 1/λ weights are unreliable."
        )
    if move is not None and move > SEED_SPREAD_WARN:
        words.append(
            f"That is more than {100 * SEED_SPREAD_WARN:.0f}%: "
            + (
                f"raise arnoldi.hvp_batch_size (b = {a.hvp_batch_size}) or set "
                "arnoldi.fixed_batch=true: the fresh batches' sampling noise dominates."
                if not a.fixed_batch
                else f"raise arnoldi.num_iters (n = {a.num_iters})."
            )
        )
    return words


SEED_SPREAD_WARN = 0.05  # top eigenvalues moving more than this between seeds: say what to raise


ARNOLDI = Method(
    name="arnoldi",
    kind=Kind.EIGENPAIR,
    equation="H⁻¹ ≈ Gᵀ diag(1/λ) G, (λ, G) the top-p̃ Ritz pairs of n Arnoldi iterations",
    config=(ARNOLDI_BLOCK, DISTILL_BLOCK),
    fingerprint=KRYLOV_FIELDS + DISTILL_FIELDS,
    fit=fit,
    check=check,
    keeps_top_k=True,
    state=(KRYLOV,),
    seed_field="arnoldi.seed",
    advice=advice,
)
