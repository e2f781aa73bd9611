"""Schulz's hyperpower iteration for the inverse of a symmetric positive definite matrix.

HyperINF (Zhou, Fan & Jaggi 2024, arXiv:2410.05090) inverts each adapted matrix's damped
generalized Fisher matrix A (``influence/gfim.py``) with Schulz's method (Schulz 1933;
Ben-Israel 1965)

    X_{k+1} = X_k (2I − A X_k),   so   R_{k+1} = I − A X_{k+1} = (I − A X_k)² = R_k²,

which converges quadratically from any X₀ with ‖I − A X₀‖ < 1 and diverges when ρ(I − A X₀) > 1.
Each iteration is two d × d matmuls (A X, then X R), all at ``Precision.HIGHEST``.

What differs from the public HyperINF code, and why:
- Its start X₀ = 5·10⁻⁵ I (``start="reference"``) gives I − A X₀ the eigenvalues 1 − 5·10⁻⁵ λ_i:
  the iteration diverges as soon as λ_max(A) > 4·10⁴ (|1 − 5·10⁻⁵ λ| > 1), and when all λ_i are
  small it needs log₂(1 / (5·10⁻⁵ λ_min)) iterations before it starts to converge.
- It runs a fixed 30 iterations. Here a ``lax.while_loop`` stops once the residual is below
  ``tol``, at ``max_iters``, when the residual is not finite (divergence), or when it stopped
  shrinking inside the contracting regime (the round-off floor, below).

``residual`` is ‖I − A X‖_F / √d, the root-mean-square singular value of R = I − A X (1 at X = 0,
whatever d). For the starts below X is a polynomial in A, so R commutes with A⁻¹ and X − A⁻¹ =
−A⁻¹R: the relative error of X, and of every solve Xv, is at most ‖R‖₂ ≤ √d · residual. That
bound is loose: R's large entries sit in the few slowest directions only until the quadratic phase
squares them away, and every measurement here (tests/test_schulz.py, the table below) found X's
relative error at or below the residual. Not ‖R‖_F itself: at the float32 floor R is round-off
spread over all d directions and ‖R‖_F overstates X's error √d-fold (11× at d = 128), so a ``tol``
on ‖R‖_F would never be met by inverses as good as float32 allows; the root-mean-square is.

Float32 floor. The computed R carries the round-off of A X, so the residual stops falling near
κ(A)·ε (ε = 6·10⁻⁸). Measured on SPD matrices with log-spaced spectra, d = 128, against the float64
inverse of the same float32 matrix (relative Frobenius error; iterations from the default start;
a float32 Cholesky/LU inverse, scipy or jnp, for comparison):

    κ        10      10²     10³     10⁴     10⁵     10⁶     10⁷
    X        3.1e-7  1.3e-6  8.9e-6  7.0e-5  5.6e-4  4.7e-3  4.6e-2
    residual 2.1e-7  1.8e-6  1.3e-5  9.7e-5  7.9e-4  6.8e-3  6.0e-2
    iters    13      15      19      19      22      26      (max_iters: floor ‖R‖_F > 1/2)
    LU/Chol  –       –       5.8e-6  –       3.6e-4  –       3.4e-2

so Schulz in float32 is as accurate as a float32 direct inverse (within 1.6×), about 0.1·κε at
d = 128, and its residual at the floor is that error within 1.5×. The floor grows with d (longer
dot products): on benchmarks/convergence.py's matrices a solve X v ends at 3.4·10⁻⁵ (d = 512,
κ = 650), 1.5·10⁻⁴ (d = 2048, κ = 1.7·10³) and 3.0·10⁻⁴ (d = 4096, κ = 3·10³), where a float32
Cholesky solve gets 2.8·10⁻⁵, 1.0·10⁻⁴ and 1.6·10⁻⁴. (``numpy.linalg.inv`` of a float32
matrix computes in float64: 2.5·10⁻⁸ at every κ, it is no float32 baseline.) Ask for a ``tol``
above the floor, or read ``converged = False`` with the floor as ``residual``: once ‖R‖_F < 1/2
an exact step at least halves ‖R‖_F, so a step that does not is round-off, and the loop stops
there instead of spending the remaining iterations.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
STARTS = ("scaled_identity", "transpose", "reference")
REFERENCE_ALPHA = 5e-5  # the public HyperINF code's X₀ = 5·10⁻⁵ I


class SchulzResult(NamedTuple):
    inverse: jax.Array  # (d, d) X, the last iterate
    iterations: jax.Array  # int32, iterations run
    residual: jax.Array  # ‖I − A X‖_F / √d of ``inverse`` (module docstring)
    converged: jax.Array  # bool: residual finite and ≤ tol


class SchulzTrace(NamedTuple):
    result: SchulzResult
    residuals: jax.Array  # (max_iters + 1,) the residual of X_k, k = 0 … iterations, NaN after
    solutions: jax.Array  # (max_iters + 1, *v.shape) X_k v for k = 0 … iterations, NaN after


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=HIGHEST)


def initial_guess(a: jax.Array, start: str = "scaled_identity") -> jax.Array:
    """X₀ for ``start``:

    - ``"scaled_identity"``: X₀ = I / U with U = min(‖A‖_∞, ‖A‖_F). Both are upper bounds of
      λ_max for symmetric A (‖A‖_∞ = max_i Σ_j |a_ij| is Gershgorin's bound, any induced norm bounds
      the spectral radius; ‖A‖_F ≥ ‖A‖₂), so the eigenvalues 1 − λ_i / U of I − A X₀ lie in
      [0, 1 − λ_min/U] ⊂ [0, 1) for SPD A: always convergent, in about log₂(U/λ_min) +
      log₂ ln(1/tol) iterations. The price of the bound over the exact λ_max is log₂(U/λ_max)
      iterations: 2.4–3.2 on the Wishart matrices of benchmarks/convergence.py (d = 512 … 4096).
    - ``"transpose"``: X₀ = Aᵀ / (‖A‖₁ ‖A‖_∞): X₀ = αAᵀ converges for every nonsingular A when
      0 < α < 2/‖A‖₂² (Ben-Israel & Cohen 1966), and ‖A‖₂² ≤ ‖A‖₁‖A‖_∞ (Pan & Schreiber 1991);
      for SPD A it takes twice the iterations (I − A X₀ has eigenvalues 1 − λ_i²/‖A‖_∞²).
    - ``"reference"``: X₀ = 5·10⁻⁵ I, the public HyperINF code's; diverges once λ_max > 4·10⁴.
    """
    d = a.shape[-1]
    eye = jnp.eye(d, dtype=a.dtype)
    inf_norm = jnp.max(jnp.sum(jnp.abs(a), axis=-1))
    if start == "scaled_identity":
        return eye / jnp.minimum(inf_norm, jnp.linalg.norm(a))
    if start == "transpose":
        return a.T / (jnp.max(jnp.sum(jnp.abs(a), axis=-2)) * inf_norm)
    if start == "reference":
        return REFERENCE_ALPHA * eye
    raise ValueError(f"start={start!r}; choose one of {STARTS}")


def _iterate(
    a: jax.Array, v: jax.Array | None, tol: float, max_iters: int, start: str
) -> tuple[SchulzResult, tuple[jax.Array, jax.Array] | None]:
    """The loop shared by ``schulz_inverse`` and ``schulz_trace`` (``v`` None: no history)."""
    a = jnp.asarray(a, jnp.result_type(a, jnp.float32))
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    x = initial_guess(a, start).astype(a.dtype)
    r = eye - _matmul(a, x)
    sqrt_d = jnp.sqrt(jnp.asarray(a.shape[-1], a.dtype))
    res = jnp.linalg.norm(r) / sqrt_d
    history = None
    if v is not None:
        v = jnp.asarray(v, a.dtype)
        nan = jnp.full((max_iters + 1,), jnp.nan, a.dtype)
        history = (nan.at[0].set(res), jnp.full((max_iters + 1, *v.shape), jnp.nan, a.dtype))
        history = (history[0], history[1].at[0].set(_matmul(x, v)))

    def keep_going(carry: tuple) -> jax.Array:
        _, _, res, prev, k, _ = carry
        # ‖R‖_F < 1/2 bounds every |r_i| by 1/2, so an exact step at least halves ‖R‖_F: a step
        # that did not is round-off (not a direction of r ≈ 1 waiting for X to grow).
        stalled = (res >= prev) & (prev * sqrt_d < 0.5)
        return (k < max_iters) & (res > tol) & jnp.isfinite(res) & ~stalled

    def step(carry: tuple) -> tuple:
        x, r, res, _, k, hist = carry
        x = x + _matmul(x, r)  # X (2I − A X) = X + X R
        r = eye - _matmul(a, x)  # recomputed, not squared: R must describe the X we hold
        new_res = jnp.linalg.norm(r) / sqrt_d
        if hist is not None:
            hist = (hist[0].at[k + 1].set(new_res), hist[1].at[k + 1].set(_matmul(x, v)))
        return x, r, new_res, res, k + 1, hist

    init = (x, r, res, jnp.asarray(jnp.inf, a.dtype), jnp.asarray(0, jnp.int32), history)
    x, _, res, _, k, history = jax.lax.while_loop(keep_going, step, init)
    return SchulzResult(x, k, res, jnp.isfinite(res) & (res <= tol)), history


@functools.partial(jax.jit, static_argnames="start")
def schulz_inverse(
    a: jax.Array, *, tol: float = 1e-4, max_iters: int = 100, start: str = "scaled_identity"
) -> SchulzResult:
    """A⁻¹ of a symmetric positive definite (d, d) ``a`` by Schulz's iteration.

    Computes in float32 unless ``a`` is float64 (with x64 enabled). Stops when ‖I − A X‖_F/√d ≤
    ``tol``, after ``max_iters``, when the residual is not finite (a start outside the region of
    convergence: ``converged`` False, ``residual`` inf/NaN), or at the float32 floor (module
    docstring). ``start``: ``initial_guess``.
    """
    return _iterate(a, None, tol, max_iters, start)[0]


@functools.partial(jax.jit, static_argnames=("max_iters", "start"))
def schulz_trace(
    a: jax.Array,
    v: jax.Array,
    *,
    tol: float = 0.0,
    max_iters: int = 100,
    start: str = "scaled_identity",
) -> SchulzTrace:
    """``schulz_inverse`` that also records the residual and X_k v after every iteration k (for
    convergence plots: benchmarks/convergence.py). ``v`` is a (d,) vector or (d, m) block."""
    result, (residuals, solutions) = _iterate(a, v, tol, max_iters, start)
    return SchulzTrace(result, residuals, solutions)


def batched_schulz_inverse(
    a: jax.Array, *, tol: float = 1e-4, max_iters: int = 100, start: str = "scaled_identity"
) -> SchulzResult:
    """``schulz_inverse`` of a stack (L, d, d), one matrix per adapted layer of the same size;
    every field gains the leading axis L. Under ``vmap`` the loop runs until the last matrix stops
    while the others' states stay frozen, so each reports its own iterations."""
    solve = functools.partial(schulz_inverse, tol=tol, max_iters=max_iters, start=start)
    return jax.vmap(solve)(a)
