"""DataInf's closed form (influence/datainf.py) against its definition with float64 numpy inverses:
(1/n) Σ_j (g_j g_jᵀ + λI)⁻¹ v, chunked or not, and the explicit (I − C)/λ."""

import jax.numpy as jnp
import numpy as np
import pytest

from influence import datainf

N, P, K = 37, 20, 3  # n not a multiple of the chunks below: the padding is exercised


def problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    grads = (rng.normal(size=(N, P)) * rng.uniform(0.1, 2.0, size=(N, 1))).astype(np.float32)
    return grads, rng.normal(size=(K, P)).astype(np.float32)


def definition(grads: np.ndarray, v: np.ndarray, lam: float) -> np.ndarray:
    """(1/n) Σ_j (g_j g_jᵀ + λI)⁻¹ applied to each row of v, every inverse by numpy in float64."""
    g = grads.astype(np.float64)
    inverse = sum(np.linalg.inv(np.outer(gj, gj) + lam * np.eye(P)) for gj in g) / N
    return v.astype(np.float64) @ inverse  # symmetric: rows of v times the inverse


def test_damping_is_a_tenth_of_the_mean_squared_entry() -> None:
    grads, _ = problem()
    lam = float(datainf.datainf_damping(jnp.asarray(grads)))
    assert lam == pytest.approx(0.1 * np.mean(grads.astype(np.float64) ** 2), rel=1e-6)


def test_apply_matches_the_averaged_sherman_morrison_inverses() -> None:
    grads, v = problem()
    lam = float(datainf.datainf_damping(jnp.asarray(grads)))
    expected = definition(grads, v, lam)
    for chunk_size in (1024, 8, 1):
        got = datainf.datainf_apply(jnp.asarray(grads), jnp.asarray(v), lam, chunk_size=chunk_size)
        assert got.shape == (K, P)
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())
    one = datainf.datainf_apply(jnp.asarray(grads), jnp.asarray(v[1]), lam, chunk_size=8)
    np.testing.assert_allclose(one, expected[1], rtol=2e-5, atol=2e-5 * np.abs(expected).max())


def test_matrix_form_equals_apply() -> None:
    grads, v = problem(1)
    lam = 0.05
    c = np.asarray(datainf.datainf_matrix(jnp.asarray(grads), lam), np.float64)
    assert c.shape == (P, P)
    np.testing.assert_allclose(c, c.T, atol=1e-7)
    explicit = v.astype(np.float64) @ (np.eye(P) - c) / lam
    applied = np.asarray(datainf.datainf_apply(jnp.asarray(grads), jnp.asarray(v), lam))
    np.testing.assert_allclose(applied, explicit, rtol=1e-5, atol=1e-5 * np.abs(explicit).max())
    np.testing.assert_allclose(explicit, definition(grads, v, lam), rtol=1e-4)


def test_it_is_not_the_exact_inverse_but_is_for_one_example() -> None:
    """The swap of inverse and mean is an approximation (n > 1), exact for n = 1."""
    grads, v = problem(2)
    lam = 0.1
    exact = v @ np.linalg.inv(grads.T.astype(np.float64) @ grads / N + lam * np.eye(P))
    approx = np.asarray(datainf.datainf_apply(jnp.asarray(grads), jnp.asarray(v), lam))
    assert np.linalg.norm(approx - exact) > 0.1 * np.linalg.norm(exact)
    g1 = grads[:1]
    exact1 = v @ np.linalg.inv(g1.T.astype(np.float64) @ g1 + lam * np.eye(P))
    np.testing.assert_allclose(
        datainf.datainf_apply(jnp.asarray(g1), jnp.asarray(v), lam), exact1, rtol=1e-4
    )
