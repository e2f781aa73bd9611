"""The iterative solvers (influence/solvers.py) against numpy on explicit SPD and indefinite
matrices: LiSSA's fixed point is (A + λI)⁻¹v (the damping's sign), block CG per row, Lanczos'
extreme eigenvalues, and the errors that name the fix."""

import jax.numpy as jnp
import numpy as np
import pytest

from influence import solvers


def _problem(seed: int = 0, d: int = 40, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3 * d, d))
    a = x.T @ x / (3 * d) + shift * np.eye(d)
    v = rng.standard_normal((3, d))
    return a, {"w": jnp.asarray(v, jnp.float32)}, v


def test_lissa_converges_to_the_damped_inverse_not_the_flipped_one():
    a, v, raw = _problem()
    damping = 0.1
    scale = float(np.linalg.eigvalsh(a).max() + damping) * 1.05
    aj = jnp.asarray(a, jnp.float32)
    got = solvers.lissa(lambda j, h: {"w": h["w"] @ aj}, v, damping=damping, scale=scale, depth=800)
    want = np.linalg.solve(a + damping * np.eye(a.shape[0]), raw.T).T
    flipped = np.linalg.solve(a - damping * np.eye(a.shape[0]), raw.T).T
    err = np.linalg.norm(np.asarray(got["w"]) - want) / np.linalg.norm(want)
    assert err < 1e-4, err
    assert np.linalg.norm(np.asarray(got["w"]) - flipped) > 0.1 * np.linalg.norm(flipped)


def test_block_cg_solves_every_row_and_reports_residuals():
    a, v, raw = _problem(1)
    aj = jnp.asarray(a, jnp.float32)
    result = solvers.conjugate_gradient(
        lambda p: {"w": p["w"] @ aj}, v, damping=0.01, tol=1e-6, max_iters=200
    )
    want = np.linalg.solve(a + 0.01 * np.eye(a.shape[0]), raw.T).T
    np.testing.assert_allclose(np.asarray(result.solution["w"]), want, rtol=1e-4, atol=1e-5)
    assert result.converged and result.residuals.shape == (3,) and result.iterations < 200
    short = solvers.conjugate_gradient(
        lambda p: {"w": p["w"] @ aj}, v, damping=0.01, tol=1e-6, max_iters=3
    )
    assert short.iterations == 3 and not short.converged and short.residuals.max() > 1e-6


def test_cg_on_an_indefinite_matrix_names_the_damping():
    a, v, _ = _problem(2, shift=-0.5)
    aj = jnp.asarray(a, jnp.float32)
    with pytest.raises(solvers.NegativeCurvatureError, match="raise the damping"):
        solvers.conjugate_gradient(
            lambda p: {"w": p["w"] @ aj}, v, damping=0.0, tol=1e-6, max_iters=200
        )


def test_lanczos_finds_both_extreme_eigenvalues():
    a, _, _ = _problem(3, shift=-0.3)
    eigvals = np.linalg.eigvalsh(a)
    aj = jnp.asarray(a, jnp.float32)
    start = {"w": jnp.ones(a.shape[0], jnp.float32)}
    top, bottom = solvers.lanczos_extremes(lambda j, q: {"w": aj @ q["w"]}, start, 30)
    assert abs(top - eigvals[-1]) < 1e-3 * abs(eigvals[-1])
    assert abs(bottom - eigvals[0]) < 1e-2 * abs(eigvals[0]) and bottom < 0
