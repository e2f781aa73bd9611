"""Schulz's iteration (influence/schulz.py) and the GFIM (influence/gfim.py) against float64 numpy:
the damped GFIM of LoRA-like gradients inverted to 1e-4, the public code's start diverging where the
default converges, honest ``converged``/``residual`` at max_iters and at the float32 floor."""

import jax.numpy as jnp
import numpy as np
import pytest

from influence import gfim, schulz

N, R, D = 64, 4, 128  # examples, LoRA rank, the adapted matrix's longer side


def lora_like_grads(seed: int = 0, k: int = 32) -> np.ndarray:
    """(N, D, R) per-example gradients of a LoRA B factor (d_out × r): each example's rank-≤R
    gradient lies in a shared k-dimensional subspace with decaying scales, like gradients driven
    by a few dominant activation directions, so the GFIM has rank ≤ k < D and the damping sets
    its condition number."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(D, k)))
    scales = 1.0 / np.arange(1, k + 1) ** 2
    coeffs = rng.normal(size=(N, R, k)) * 1e-3
    return np.einsum("nrk,k,dk->ndr", coeffs, scales, basis).astype(np.float32)


def spd(eigvals: np.ndarray, seed: int = 0) -> np.ndarray:
    """A float32 SPD matrix Q diag(eigvals) Qᵀ, Q random orthogonal, exactly symmetric."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigvals),) * 2))
    a = (q * eigvals) @ q.T
    return (0.5 * (a + a.T)).astype(np.float32)


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref))


def test_as_rows_orients_leaves_and_from_rows_inverts() -> None:
    for shape, rows_shape in [((4, 128), (4, 128)), ((128, 4), (4, 128)), ((7,), (1, 7))]:
        leaf = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
        rows = gfim.as_rows(leaf)
        assert rows.shape == rows_shape
        np.testing.assert_array_equal(gfim.from_rows(rows, shape), leaf)
    square = jnp.ones((5, 5)).at[0, 1].set(2.0)
    np.testing.assert_array_equal(gfim.as_rows(square), square)  # square: kept as is


def test_schulz_inverts_the_damped_gfim_of_lora_like_gradients() -> None:
    grads = lora_like_grads()
    rows = gfim.stacked_rows(jnp.asarray(grads))
    assert rows.shape == (N, R, D)
    a = np.asarray(gfim.damped_gfim(rows))
    # The GFIM and damping by their definitions, in float64.
    rows64 = np.swapaxes(grads, 1, 2).astype(np.float64)
    lam = 0.1 * np.mean(rows64**2) + 1e-8
    expected = np.einsum("nrd,nre->de", rows64, rows64) / N + lam * np.eye(D)
    assert rel_err(a, expected) < 1e-6
    ref = np.linalg.inv(a.astype(np.float64))
    kappa = np.linalg.cond(a.astype(np.float64))
    result = schulz.schulz_inverse(jnp.asarray(a), tol=1e-5, max_iters=100)
    err = rel_err(result.inverse, ref)
    print(f"κ={kappa:.3g}: {int(result.iterations)} iterations, residual "
          f"{float(result.residual):.2e}, relative error {err:.2e}")  # fmt: skip
    assert bool(result.converged) and float(result.residual) <= 1e-5
    assert err <= 1e-4
    assert 5 <= int(result.iterations) <= 40
    # The residual is ‖I − A X‖_F / √d of the inverse returned (at the floor, float32's A X adds
    # its own round-off to it: within 2× of the float64 product's).
    recomputed = np.linalg.norm(np.eye(D) - a.astype(np.float64) @ np.asarray(result.inverse))
    assert 0.5 < float(result.residual) / (recomputed / np.sqrt(D)) < 2.0
    # Applied to a B-shaped (D, R) gradient: its rows times the inverse, back in its shape.
    g = grads[0]
    applied = gfim.apply_inverse(jnp.asarray(g), result.inverse)
    assert applied.shape == (D, R)
    np.testing.assert_allclose(
        applied, ref @ g.astype(np.float64), rtol=1e-3, atol=1e-6 * np.abs(ref @ g).max()
    )


def test_batched_matches_one_by_one() -> None:
    stack = np.stack([spd(np.geomspace(1.0, 1e2, 32), 1), spd(np.geomspace(1e-3, 1e2, 32), 2)])
    batched = schulz.batched_schulz_inverse(jnp.asarray(stack), tol=1e-3, max_iters=60)
    for i in range(2):
        one = schulz.schulz_inverse(jnp.asarray(stack[i]), tol=1e-3, max_iters=60)
        assert int(batched.iterations[i]) == int(one.iterations)
        np.testing.assert_allclose(batched.inverse[i], one.inverse, rtol=1e-5, atol=1e-6)
    assert int(batched.iterations[0]) < int(batched.iterations[1])  # κ 10² vs 10⁵
    assert bool(np.all(batched.converged))


def test_default_start_converges_where_the_reference_start_diverges() -> None:
    """λ_max = 10⁵ > 4·10⁴: X₀ = 5·10⁻⁵ I leaves I − A X₀ an eigenvalue 1 − 5 = −4."""
    a = spd(np.geomspace(10.0, 1e5, 64))
    ref = np.linalg.inv(a.astype(np.float64))
    for start in ("scaled_identity", "transpose"):
        result = schulz.schulz_inverse(jnp.asarray(a), tol=1e-3, max_iters=100, start=start)
        assert bool(result.converged), start
        assert rel_err(result.inverse, ref) < 1e-3, start
    trace = schulz.schulz_trace(jnp.asarray(a), jnp.ones(64), max_iters=30, start="reference")
    residuals = np.asarray(trace.residuals)
    done = int(trace.result.iterations)
    assert not bool(trace.result.converged)
    assert not np.isfinite(float(trace.result.residual))  # overflowed: stopped, not run to 30
    assert done < 30
    finite = residuals[: done + 1][np.isfinite(residuals[: done + 1])]
    assert len(finite) >= 3 and np.all(np.diff(finite) > 0)  # grew every iteration
    assert finite[-1] > 1e6


def test_max_iters_is_reported_unconverged_with_its_residual() -> None:
    a = jnp.asarray(spd(np.geomspace(1e-2, 1e2, 64)))
    result = schulz.schulz_inverse(a, tol=1e-4, max_iters=3)
    assert int(result.iterations) == 3
    assert not bool(result.converged)
    res = float(result.residual)
    assert np.isfinite(res) and res > 1e-4
    a64 = np.asarray(a, np.float64)
    expected = np.linalg.norm(np.eye(64) - a64 @ np.asarray(result.inverse, np.float64)) / 8.0
    assert res == pytest.approx(expected, rel=1e-4)
    # The same matrix converges given the iterations.
    assert bool(schulz.schulz_inverse(a, tol=1e-4, max_iters=100).converged)


def test_a_tol_below_the_float32_floor_stops_at_the_floor() -> None:
    """κ = 10⁵: the residual cannot fall much below 10⁻³ (module docstring's table); asked for
    10⁻¹⁰ the loop stops when the residual stops shrinking, well before max_iters, and says it did
    not converge."""
    a = spd(np.geomspace(1.0, 1e5, 128))
    result = schulz.schulz_inverse(jnp.asarray(a), tol=1e-10, max_iters=200)
    assert int(result.iterations) < 40
    assert not bool(result.converged)
    assert 1e-5 < float(result.residual) < 1e-2
    assert rel_err(result.inverse, np.linalg.inv(a.astype(np.float64))) < 2e-3


def test_trace_records_the_iterates() -> None:
    """Also: the reference start converges where λ_max < 4·10⁴ (the same compiled loop as above)."""
    a = spd(np.geomspace(1e3, 1e4, 64))
    v = np.arange(64, dtype=np.float32)
    trace = schulz.schulz_trace(
        jnp.asarray(a), jnp.asarray(v), tol=1e-5, max_iters=30, start="reference"
    )
    k = int(trace.result.iterations)
    assert bool(trace.result.converged) and k < 30
    np.testing.assert_allclose(trace.solutions[k], trace.result.inverse @ v, rtol=1e-5)
    assert float(trace.residuals[k]) == float(trace.result.residual)
    assert np.all(np.isnan(np.asarray(trace.residuals[k + 1 :])))
    np.testing.assert_allclose(trace.solutions[0], schulz.REFERENCE_ALPHA * v, rtol=1e-6)


def test_unknown_start_is_refused() -> None:
    with pytest.raises(ValueError, match="start="):
        schulz.schulz_inverse(jnp.eye(3), start="identity")
