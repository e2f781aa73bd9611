"""Iterative solvers of (H + λI) x = v for blocks of vectors: LiSSA and conjugate gradient.

The baselines of Schioppa et al. 2022 (Table 1) that never form H: each solve is a sequence of
Hessian-vector products. Vectors are *stacked* pytrees (``influence/pytree.py``): k rows, each
shaped like the (selected) params, solved at once (one vmapped HVP per step serves every row).

- **LiSSA** (Agarwal, Bullins & Hazan 2017; Koh & Liang 2017, §3): the truncated Neumann series
  h_j = v + h_{j−1} − (H_j + λI) h_{j−1} / s, with H_j the Hessian on step j's batch, whose
  fixed point is h = s (H + λI)⁻¹ v, so (H + λI)⁻¹ v ≈ h_depth / s. It converges when every
  eigenvalue μ of H + λI lies in (0, 2s): s is an upper bound of λ_max (the *scale*) and λ (the
  *damping*) must lift the negative eigenvalues of a non-convex H. Its error after j steps is
  (1 − μ_min/s)^j: depth ∝ κ = s/μ_min steps. The damping enters with a + sign here: the
  HyperINF code's variant has it flipped, whose fixed point is (H − λI)⁻¹ v (issue 13).
- **CG** (Hestenes & Stiefel 1952) on the symmetric positive definite H + λI, one scalar
  recursion per row: converges in at most p steps in exact arithmetic, in ~√κ·log(1/tol) in
  practice (quadratically fewer HVPs than LiSSA), but needs the *same* operator every step
  (full-data HVPs, not LiSSA's fresh batches) and positive curvature along each search direction.

The matvecs are callables, so the same code runs the pipeline's sharded HVPs (``methods/lissa.py``,
``methods/cg.py``) and the synthetic benchmark's explicit matrices (``benchmarks/convergence.py``).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from influence import pytree

Vectors = Any  # a stacked pytree: leaves (k, *leaf.shape)


def row_dots(a: Vectors, b: Vectors) -> jax.Array:
    """(⟨a_i, b_i⟩)_i for two stacked pytrees of k rows: (k,) float32."""

    def leaf(x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.sum((x * y).reshape(x.shape[0], -1), axis=1, dtype=jnp.float32)

    return sum(jax.tree.leaves(jax.tree.map(leaf, a, b)))


def _rows(coeffs: jax.Array, x: Vectors) -> Vectors:
    """coeffs[i] · x_i for every row i."""
    return jax.tree.map(
        lambda leaf: (coeffs.reshape((-1,) + (1,) * (leaf.ndim - 1)) * leaf).astype(leaf.dtype), x
    )


def lanczos_extremes(
    matvec: Callable[[int, Any], Any], v: Any, num_iters: int
) -> tuple[float, float]:
    """(λ_max, λ_min) estimates of a symmetric H from ``num_iters`` Lanczos steps from ``v``
    (a pytree; ``matvec(j, q)`` = H q on step j's batch): the extreme Ritz values of the
    tridiagonal T_m. Three vectors are kept, no basis: the lost orthogonality makes copies of
    converged Ritz values, not wrong extremes (Paige 1976), and the extremes converge much faster
    than a power iteration's, the smallest included (LiSSA's scale and damping need both)."""
    q = jax.tree.map(lambda x: x / jnp.sqrt(pytree.vdot(v, v)), v)
    previous, beta, alphas, betas = None, 0.0, [], []
    for j in range(num_iters):
        w = matvec(j, q)
        alpha = float(pytree.vdot(q, w))
        w = pytree.axpy(-alpha, q, w)
        if previous is not None:
            w = pytree.axpy(-beta, previous, w)
        alphas.append(alpha)
        beta = float(jnp.sqrt(pytree.vdot(w, w)))
        if not np.isfinite(beta) or beta <= 1e-7 * max(abs(a) for a in alphas):
            break  # an invariant subspace: T_m's eigenvalues are exact
        betas.append(beta)
        previous, q = q, pytree.scale(1.0 / beta, w)
    m = len(alphas)
    tridiagonal = np.diag(alphas) + np.diag(betas[: m - 1], 1) + np.diag(betas[: m - 1], -1)
    ritz = np.linalg.eigvalsh(tridiagonal)
    return float(ritz[-1]), float(ritz[0])


def lissa_update(h: Vectors, v: Vectors, hvp_h: Vectors, damping: float, scale: float) -> Vectors:
    """One LiSSA step: v + h − (H h + λ h) / s, given ``hvp_h`` = H h (leaf by leaf)."""
    return jax.tree.map(
        lambda hi, vi, hhi: (vi + hi - (hhi + damping * hi) / scale).astype(hi.dtype), h, v, hvp_h
    )


def lissa(
    matvec: Callable[[int, Vectors], Vectors],
    v: Vectors,
    *,
    damping: float,
    scale: float,
    depth: int,
) -> Vectors:
    """(H + λI)⁻¹ v ≈ h_depth / s by the recursion above; ``matvec(j, h)`` = H_j h, the HVP of
    step j (a fresh batch each step, or the same operator). A host loop: the pipeline jits one
    step (``methods/lissa.py`` fuses the HVP and the update); a conv HVP inside ``lax.fori_loop``
    runs ~15× slower on the CPU (README, Speed)."""
    h = v
    for j in range(depth):
        h = lissa_update(h, v, matvec(j, h), damping, scale)
    return jax.tree.map(lambda x: x / scale, h)


class CGResult(NamedTuple):
    """``solution`` (k rows), the ``iterations`` run, each row's relative residual
    ‖v − (H + λI)x‖/‖v‖ (``residuals``, recomputed by the recursion), and whether every row
    reached the tolerance (``converged``)."""

    solution: Vectors
    iterations: int
    residuals: np.ndarray
    converged: bool


class NegativeCurvatureError(ValueError):
    """CG met a direction p with pᵀ(H + λI)p ≤ 0: H + λI is not positive definite."""


def cg_init(v: Vectors) -> tuple[Vectors, Vectors, Vectors, jax.Array]:
    """(x, r, p, ‖r‖²) at the start: x = 0, r = p = v."""
    return jax.tree.map(jnp.zeros_like, v), v, v, row_dots(v, v)


def cg_update(
    x: Vectors,
    r: Vectors,
    p: Vectors,
    rs: jax.Array,
    ap: Vectors,
    active: jax.Array,
) -> tuple[Vectors, Vectors, Vectors, jax.Array, jax.Array]:
    """One CG step per row, given ``ap`` = (H + λI) p: α = ‖r‖²/pᵀAp, x += αp, r −= αAp,
    β = ‖r'‖²/‖r‖², p = r' + βp. Rows not ``active`` (converged) are left as they are.
    Returns (x, r, p, ‖r'‖², pᵀAp)."""
    curvature = row_dots(p, ap)
    alpha = jnp.where(active & (curvature > 0), rs / jnp.where(curvature > 0, curvature, 1.0), 0.0)
    x = jax.tree.map(lambda a, b: a + b, x, _rows(alpha, p))
    r = jax.tree.map(lambda a, b: a - b, r, _rows(alpha, ap))
    rs_new = row_dots(r, r)
    beta = jnp.where(active, rs_new / jnp.where(rs > 0, rs, 1.0), 0.0)
    p = jax.tree.map(lambda a, b: a + b, r, _rows(beta, p))
    return x, r, p, jnp.where(active, rs_new, rs), curvature


def conjugate_gradient(
    matvec: Callable[[Vectors], Vectors],
    v: Vectors,
    *,
    damping: float,
    tol: float,
    max_iters: int,
    step: Callable | None = None,
) -> CGResult:
    """(H + λI)⁻¹ v for k rows at once, each to ‖residual‖ ≤ tol·‖v‖ or ``max_iters`` steps;
    ``matvec(p)`` = H p. ``step`` replaces the jitted ``cg_update`` (the pipeline passes one
    compiled with its shardings). A non-positive curvature pᵀ(H + λI)p on an unconverged row is
    a ``NegativeCurvatureError`` naming the fix (raise the damping)."""
    update = step or jax.jit(cg_update)
    x, r, p, rs = cg_init(v)
    target = np.asarray(rs) * tol**2
    iterations = 0
    while iterations < max_iters:
        active = np.asarray(rs) > target
        if not active.any():
            break
        ap = jax.tree.map(lambda a, b: a + damping * b, matvec(p), p)
        x, r, p, rs, curvature = update(x, r, p, rs, ap, jnp.asarray(active))
        iterations += 1
        bad = active & ~(np.asarray(curvature) > 0)
        if bad.any():
            raise NegativeCurvatureError(
                f"conjugate gradient met non-positive curvature pᵀ(H + λI)p = "
                f"{float(np.asarray(curvature)[bad].min()):.3e} at step {iterations} (λ = "
                f"{damping}): H + λI is not positive definite at these params; raise the damping"
            )
    residuals = np.sqrt(np.asarray(rs) / np.maximum(target / tol**2, 1e-30))
    return CGResult(x, iterations, residuals, bool(np.all(residuals <= tol)))
