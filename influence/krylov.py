"""Arnoldi iteration over Hessian-vector products: Algorithm 1, lines 1–10, of Schioppa et al. (2022).

After n steps, with Q_k the orthonormal Krylov basis and H̃ the (n + 1) × n Hessenberg matrix,

    H Q_n = Q_{n+1} H̃                                                      (Alg. 1, lines 4–9)

so the eigenpairs of the square block H̃[:n, :n] (``distill.py``) approximate the extreme
eigenpairs of the Hessian H of the training loss.

Design choices, each measured or required by scale:
- The basis is a *stacked pytree* (one array of shape (n + 1, *leaf.shape) per parameter leaf) so it
  can be sharded exactly like the parameters; a 300M-parameter model with n = 200 needs 240 GB.
- Orthogonalisation is Gram–Schmidt run twice ("twice is enough", Giraud et al. 2005): one pass
  loses orthogonality once the Ritz values converge, which corrupts the Hessenberg matrix; the
  reference implementation had only one pass. Modified GS twice (MGS2, the default) and classical
  GS twice (CGS2) give the same orthogonality. MGS2 makes k + 1 dependent dot/axpy pairs per pass
  (k + 1 all-reduces on a sharded basis); CGS2 two matrix–vector products over the whole masked
  basis (one all-reduce). On 2 CPU cores they cost the same (benchmarks/speed.py); on a sharded basis
  CGS2 trades reading the unused rows for far fewer collectives. DGKS is MGS whose second pass
  runs only when the first cancelled more than 1 − 1/√2 of ‖H q_k‖ (Daniel et al. 1976): the
  same orthogonality, on the Flax CNN the second pass in 61% of iterations on a fixed batch and
  31% on fresh ones, 16% less overhead (opt-in: a small gain on 2 CPU cores). Block classical
  GS twice (BCGS2) sweeps the basis a block of ``block_rows`` rows at a time, each block used for
  its dot products and its update while it is loaded (classical within a block, blocks in
  sequence as in MGS): one read of the basis per pass, so a basis streamed from host memory or
  disk (``parallel/offload.py``) is read twice per iteration, against k + 1 dependent reads for
  MGS and four sweeps for CGS2 (whose update needs every dot product first). Twice is enough for
  block GS too (Barlow & Smoktunowicz 2013, BCGS2).
- Each step is one function of a *traced* iteration index, so it compiles once; the loop over
  iterations is Python (``run_arnoldi``) because a conv HVP inside ``lax.fori_loop`` is ~15x slower
  on CPU. The Gram–Schmidt inner loop has no HVP in it and stays a ``fori_loop``.
- Breakdown (an invariant Krylov subspace: the new direction's norm falls below ``breakdown_tol``
  times the norm of H v) stops the iteration early; the state up to that point is exact. The step
  records it in the state itself: h_{k+1,k} = 0 and q_{k+1} = 0, as in exact arithmetic, so a step
  run after a breakdown is an exact no-op (H·0 = 0) and a restored state tells whether it broke
  down (``completed_iterations``). That lets ``run_arnoldi`` dispatch step k + 1 before it reads
  step k's breakdown flag: the host never stalls the device between iterations. The default
  1e-4 sits between the two regimes measured in float32: the residual of an exactly invariant step
  is HVP round-off, 1e-7 … 8.4e-6 of ‖H q_k‖ (tests/test_arnoldi.py, rank-3 problems), while on the
  trained small CNN of Koh & Liang it never fell below 0.32 of ‖H q_k‖ in 200 iterations, fixed or
  fresh batches. A tolerance at float32 eps (1e-7) misses real breakdowns and normalises round-off
  into the basis.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple, TypedDict

import jax
import jax.numpy as jnp
import numpy as np

from influence import pytree
from influence.hvp import HVP
from influence.types import Batch, Params

DEFAULT_BREAKDOWN_TOL = 1e-4


class KrylovState(TypedDict):
    """What Arnoldi carries between iterations (and what is checkpointed).

    krylov_basis: stacked pytree, leaves (n + 1, *leaf.shape); row k is q_k.
    hessenberg: (n + 1, n) float32; column k holds ⟨q_j, H q_k⟩ for j ≤ k and ‖w_k‖ at k + 1
      (0 where iteration k broke down).
    """

    krylov_basis: Params
    hessenberg: jax.Array


class StepInfo(TypedDict):
    hvp_norm: jax.Array  # ‖H q_k‖ before orthogonalisation
    residual_norm: jax.Array  # ‖w‖ after orthogonalisation = hessenberg[k + 1, k]
    breakdown: jax.Array  # bool: residual_norm <= breakdown_tol * hvp_norm
    reorthogonalized: jax.Array  # bool: the second Gram–Schmidt pass ran (always, but for dgks)


class ArnoldiResult(NamedTuple):
    state: KrylovState
    num_completed: int  # iterations whose column of the Hessenberg matrix is filled
    breakdown: str | None  # why the iteration stopped early, or None


def start_vector(params_like: Params, key: jax.Array) -> Params:
    """q_0 ~ N(0, I), normalised (Alg. 1, line 1); leaf i draws from ``fold_in(key, i)``.

    With JAX's partitionable threefry the draw does not depend on how the output is sharded, so every
    mesh starts from the same vector.
    """
    leaves, treedef = jax.tree.flatten(params_like)
    drawn = [
        jax.random.normal(jax.random.fold_in(key, i), leaf.shape, jnp.float32).astype(leaf.dtype)
        for i, leaf in enumerate(leaves)
    ]
    q0 = jax.tree.unflatten(treedef, drawn)
    return pytree.scale(1.0 / pytree.norm(q0), q0)


def init_state(params_like: Params, num_iters: int, key: jax.Array) -> KrylovState:
    """Storage for n + 1 basis vectors (of ``params_like``'s dtypes: float32, or bfloat16 to halve
    the basis, ``arnoldi.basis_dtype``), q_0 set, and an all-zero Hessenberg matrix."""
    basis = pytree.stacked_zeros(params_like, num_iters + 1)
    basis = pytree.stacked_set(basis, 0, start_vector(params_like, key))
    return KrylovState(
        krylov_basis=basis, hessenberg=jnp.zeros((num_iters + 1, num_iters), jnp.float32)
    )


def _mgs_pass(
    krylov_basis: Params, w: Params, coeffs: jax.Array, k: jax.Array
) -> tuple[Params, jax.Array]:
    """One modified Gram–Schmidt sweep of w against q_0 … q_k, accumulating the projections.

    k + 1 sequential dot/axpy pairs: each reads q_j and w once more, and on a sharded basis each dot
    is its own all-reduce.
    """

    def body(j: jax.Array, carry: tuple[Params, jax.Array]) -> tuple[Params, jax.Array]:
        w, coeffs = carry
        q_j = pytree.stacked_get(krylov_basis, j)
        c = pytree.vdot(q_j, w)
        return pytree.axpy(-c, q_j, w), coeffs.at[j].add(c)

    return jax.lax.fori_loop(0, k + 1, body, (w, coeffs))


def _cgs_pass(
    krylov_basis: Params, w: Params, coeffs: jax.Array, k: jax.Array
) -> tuple[Params, jax.Array]:
    """One classical Gram–Schmidt sweep: c = Qᵀ w for all rows at once, then w −= Q c.

    Two matrix–vector products over the whole stacked basis (rows after k are masked out), so the
    basis is read twice per sweep at full memory bandwidth and a sharded basis needs one all-reduce,
    instead of k + 1 dependent dot products.
    """
    rows = jnp.arange(coeffs.shape[0])
    c = jnp.where(rows <= k, pytree.stacked_vdot(krylov_basis, w), 0.0)
    return pytree.axpy(-1.0, pytree.stacked_combine(c, krylov_basis), w), coeffs + c


def block_pass(
    block: Params, w: Params, coeffs: jax.Array, row0: jax.Array, first: jax.Array, k: jax.Array
) -> tuple[Params, jax.Array]:
    """One block of a BCGS sweep: c = Q_bᵀ w over the block's rows r (row0 + i) with
    first ≤ r ≤ k, then w −= Q_b c; c is added to ``coeffs`` at those rows.

    ``block`` is a stacked tree of B rows starting at basis row ``row0``; rows outside
    [first, k] (padding, or rows an earlier block already swept) get coefficient 0 exactly.
    """
    num = jax.tree.leaves(block)[0].shape[0]
    rows = row0 + jnp.arange(num)
    c = jnp.where((rows >= first) & (rows <= k), pytree.stacked_vdot(block, w), 0.0)
    w = pytree.axpy(-1.0, pytree.stacked_combine(c, block), w)
    return w, coeffs.at[rows].add(c, mode="drop")


DEFAULT_BLOCK_ROWS = 8


def _bcgs_pass(
    krylov_basis: Params,
    w: Params,
    coeffs: jax.Array,
    k: jax.Array,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> tuple[Params, jax.Array]:
    """One BCGS sweep over a device-resident basis: blocks of ``block_rows`` rows up to row k
    (the last block's start is clamped to fit; its rows already swept are masked)."""
    total = jax.tree.leaves(krylov_basis)[0].shape[0]
    size = min(block_rows, total)

    def body(j: jax.Array, carry: tuple[Params, jax.Array]) -> tuple[Params, jax.Array]:
        first = j * size
        row0 = jnp.minimum(first, total - size)
        block = jax.tree.map(lambda s: jax.lax.dynamic_slice_in_dim(s, row0, size, 0), krylov_basis)
        return block_pass(block, *carry, row0, first, k)

    return jax.lax.fori_loop(0, k // size + 1, body, (w, coeffs))


ORTHOGONALIZATION = {
    "bcgs2": _bcgs_pass,
    "cgs2": _cgs_pass,
    "dgks": _mgs_pass,
    "mgs2": _mgs_pass,
}

# Daniel, Gragg, Kaufman & Stewart (1976): a Gram–Schmidt pass that keeps more than 1/√2 of
# ‖w‖ has cancelled too little to lose orthogonality, and the re-orthogonalisation pass is skipped.
DGKS_ETA = 1.0 / np.sqrt(2.0)


def arnoldi_step(
    hvp: HVP,
    state: KrylovState,
    params: Params,
    batch: Batch,
    k: jax.Array,
    breakdown_tol: float = DEFAULT_BREAKDOWN_TOL,
    orthogonalization: str = "mgs2",
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> tuple[KrylovState, StepInfo]:
    """Iteration k (0-based) of Algorithm 1, lines 3–9: fills column k and q_{k+1}.

    Shape-stable in k, so it jits once for all iterations. ``orthogonalization`` is "mgs2"
    (modified Gram–Schmidt, twice), "cgs2" (classical Gram–Schmidt, twice) or "dgks" (modified
    Gram–Schmidt, the second pass only when the first left less than ``DGKS_ETA`` of ‖H q_k‖:
    Daniel et al. 1976) or "bcgs2" (block classical Gram–Schmidt, twice, ``block_rows`` rows
    a block); all keep the basis orthonormal to float32 round-off (Giraud et al. 2005).
    """
    if orthogonalization not in ORTHOGONALIZATION:
        raise ValueError(
            f"orthogonalization={orthogonalization!r}; choose one of {sorted(ORTHOGONALIZATION)}"
        )
    gram_schmidt_pass = ORTHOGONALIZATION[orthogonalization]
    if orthogonalization == "bcgs2":
        gram_schmidt_pass = functools.partial(_bcgs_pass, block_rows=block_rows)
    basis, hessenberg = state["krylov_basis"], state["hessenberg"]
    w, hvp_norm = apply_hvp(hvp, params, batch, pytree.stacked_get(basis, k))  # line 4
    coeffs = jnp.zeros((hessenberg.shape[0],), jnp.float32)
    w, coeffs = gram_schmidt_pass(basis, w, coeffs, k)  # lines 5–7
    if orthogonalization == "dgks":
        # The second MGS sweep runs over rows 0 … k only when the first cancelled more than
        # 1 − DGKS_ETA of ‖Hq‖; otherwise its fori_loop has no trips. A trip count, not a
        # lax.cond, so the basis is never an operand of a conditional.
        first_norm = pytree.norm(w)
        reorthogonalized = first_norm < DGKS_ETA * hvp_norm
        w, coeffs = _mgs_pass(basis, w, coeffs, jnp.where(reorthogonalized, k, -1))
    else:
        w, coeffs = gram_schmidt_pass(basis, w, coeffs, k)  # re-orthogonalisation pass
        reorthogonalized = jnp.asarray(True)
    q_next, hessenberg, info = complete(w, coeffs, hvp_norm, hessenberg, k, breakdown_tol)
    info["reorthogonalized"] = reorthogonalized
    basis = pytree.stacked_set(basis, k + 1, q_next)  # line 9
    return KrylovState(krylov_basis=basis, hessenberg=hessenberg), info


def apply_hvp(hvp: HVP, params: Params, batch: Batch, q_k: Params) -> tuple[Params, jax.Array]:
    """(w = H q_k, ‖H q_k‖), Alg. 1 line 4; a bfloat16 basis stores q_k, H q_k is in float32."""
    q_k = jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), q_k)
    w = hvp(params, batch, q_k)
    return w, pytree.norm(w)


def complete(
    w: Params,
    coeffs: jax.Array,
    hvp_norm: jax.Array,
    hessenberg: jax.Array,
    k: jax.Array,
    breakdown_tol: float,
) -> tuple[Params, jax.Array, StepInfo]:
    """Alg. 1 lines 8–9 once w is orthogonalised: (q_{k+1}, the Hessenberg matrix with column
    k filled, the step's info; ``reorthogonalized`` True)."""
    residual_norm = pytree.norm(w)  # line 8: h_{k+1,k} = ‖w‖
    breakdown = residual_norm <= breakdown_tol * jnp.maximum(hvp_norm, jnp.finfo(jnp.float32).tiny)
    # At a breakdown h_{k+1,k} and q_{k+1} are 0: the invariant subspace's exact values, and the
    # mark that makes every later step a no-op (q = 0 gives H q = 0 bit for bit).
    coeffs = coeffs.at[k + 1].set(jnp.where(breakdown, 0.0, residual_norm))
    inv = jnp.where(breakdown, 0.0, 1.0 / jnp.where(breakdown, 1.0, residual_norm))
    hessenberg = jax.lax.dynamic_update_index_in_dim(hessenberg, coeffs, k, axis=1)
    info = StepInfo(
        hvp_norm=hvp_norm,
        residual_norm=residual_norm,
        breakdown=breakdown,
        reorthogonalized=jnp.asarray(True),
    )
    return pytree.scale(inv, w), hessenberg, info  # line 9: q_{k+1} = w / h_{k+1,k}


StepFn = Callable[[KrylovState, Params, Batch, jax.Array], tuple[KrylovState, StepInfo]]


def completed_iterations(hessenberg: np.ndarray, done: int) -> int:
    """Of the ``done`` iterations a state has been through, how many count: all of them, or up to
    and including the one that broke down (h_{k+1,k} = 0; steps after it were no-ops)."""
    h = np.asarray(hessenberg)
    for k in range(done):
        if h[k + 1, k] == 0.0:
            return k + 1
    return done


def breakdown_reason(iteration: int, info: StepInfo) -> str:
    return (
        f"Krylov subspace became invariant at iteration {iteration}: residual norm "
        f"{float(info['residual_norm']):.3e} <= breakdown_tol x ‖Hq‖ "
        f"({float(info['hvp_norm']):.3e}); keeping {iteration + 1} Ritz pairs"
    )


def run_arnoldi(
    step: StepFn,
    state: KrylovState,
    params: Params,
    get_batch: Callable[[int], Batch],
    num_iters: int,
    start_iteration: int = 0,
    on_iteration: Callable[[int, KrylovState, StepInfo], None] | None = None,
) -> ArnoldiResult:
    """The outer loop of Algorithm 1 (line 2), from ``start_iteration`` to ``num_iters``.

    ``step`` is ``arnoldi_step`` with the HVP bound, usually jitted with shardings; ``get_batch(k)``
    returns the HVP batch of iteration k (a deterministic function of k, so a resumed run draws the
    same data). ``on_iteration(k + 1, state, info)`` runs after iteration k is dispatched:
    checkpointing and logging hook in there, and should read ``info`` only when they must (reading
    a value waits for the device).

    Step k + 1 is dispatched before step k's breakdown flag is read, so the host prepares the next
    batch while the device computes, and never waits between iterations. When step k broke down,
    the step already dispatched after it was an exact no-op: the returned state is the state of
    iteration k, bit for bit.
    """
    pending: tuple[int, StepInfo] | None = None  # the last step dispatched, flag not yet read
    for k in range(start_iteration, num_iters):
        state, info = step(state, params, get_batch(k), jnp.asarray(k, jnp.int32))
        if pending is not None and bool(pending[1]["breakdown"]):
            return ArnoldiResult(state, pending[0] + 1, breakdown_reason(*pending))
        if on_iteration is not None:
            on_iteration(k + 1, state, info)
        pending = (k, info)
    if pending is not None and bool(pending[1]["breakdown"]):
        return ArnoldiResult(state, pending[0] + 1, breakdown_reason(*pending))
    return ArnoldiResult(state, num_iters, None)
