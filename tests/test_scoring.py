"""Influence scores (influence/scoring.py) against explicit per-example gradients: the JVP projector
is G ∇ℓ(x), and self-influence / train→test influence are the low-rank quadratic forms built from
∇ℓ, with eigenpairs from a real (short) Arnoldi run on the small CNN."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from influence import distill, factorised, krylov, scoring
from influence.distill import Eigenpairs
from influence.hvp import make_hvp
from influence.types import Batch, Params
from parallel import programs, sharding
from parallel.mesh import make_mesh
from tasks import mnist
from tasks.base import ClassificationTask
from tasks.sources import read_all

L2 = 1e-3
NUM_ITERS, TOP_K = 20, 5
NUM_TRAIN, NUM_TEST = 16, 8


@pytest.fixture(scope="module")
def task() -> ClassificationTask:
    return mnist.make_task("small_cnn")


@pytest.fixture(scope="module")
def params(task: ClassificationTask) -> Params:
    return task.init_params(jax.random.key(0))


@pytest.fixture(scope="module")
def splits() -> tuple[Batch, Batch, Batch]:
    """(Hessian batch of 64, train batch of 16 with flipped labels, clean test batch of 8)."""
    train, test = map(
        read_all,
        mnist.load_splits(num_train=64 + NUM_TRAIN, num_eval=NUM_TEST, flip_fraction=0.2, seed=0),
    )

    def columns(split: dict[str, np.ndarray], rows: slice) -> Batch:
        return {
            "image": jnp.asarray(split["image"][rows]),
            "label": jnp.asarray(split["label"][rows]),
        }

    return columns(train, slice(0, 64)), columns(train, slice(64, None)), columns(test, slice(None))


@pytest.fixture(scope="module")
def eigenpairs(
    task: ClassificationTask, params: Params, splits: tuple[Batch, Batch, Batch]
) -> Eigenpairs:
    """Top-5 (by |λ|) eigenpairs distilled from 20 Arnoldi steps: realistic, unevenly spread λ."""
    hessian_batch = splits[0]
    step = jax.jit(functools.partial(krylov.arnoldi_step, make_hvp(task.per_example_loss, L2)))
    # Jitted as in parallel/programs.py: eager, each leaf's random draw compiles separately (~6 s).
    state = jax.jit(krylov.init_state, static_argnums=1)(params, NUM_ITERS, jax.random.key(1))
    result = krylov.run_arnoldi(step, state, params, lambda k: hessian_batch, NUM_ITERS)
    assert result.num_completed == NUM_ITERS
    pairs = distill.distill(
        np.asarray(result.state["hessenberg"]), result.state["krylov_basis"], NUM_ITERS, TOP_K
    )
    print(f"\neigenvalues: {pairs.eigvals}")
    return pairs


def per_example_gradients(task: ClassificationTask, params: Params, batch: Batch) -> np.ndarray:
    """(B, P) float64 matrix of ∇_θ ℓ(θ, x_i), flattened in ravel_pytree order, via vmap(grad)."""
    flat, unravel = ravel_pytree(params)

    def single_loss(x: jax.Array, example: Batch) -> jax.Array:
        one = {k: v[None] for k, v in example.items()}
        return task.per_example_loss(unravel(x), one)[0]

    grads = jax.jit(jax.vmap(jax.grad(single_loss), in_axes=(None, 0)))(flat, batch)
    return np.asarray(grads, np.float64)


def eigvec_matrix(pairs: Eigenpairs) -> np.ndarray:
    """G: the distilled eigenvectors as a (p̃, P) float64 matrix, ravel_pytree order."""
    return np.asarray(jax.vmap(lambda tree: ravel_pytree(tree)[0])(pairs.eigvecs), np.float64)


def scale_atol(reference: np.ndarray, rel: float = 1e-5) -> float:
    """Absolute tolerance for float32 results: entries that are sums of mixed-sign terms can cancel
    far below the terms' size, where float32 round-off (~1e-7 of the terms) dominates any rtol.
    ``rel`` of the largest entry bounds that round-off (well above it, well below any real error)."""
    return rel * float(np.abs(reference).max())


@pytest.mark.slow
def test_projector_equals_eigvecs_times_per_example_gradients(
    task: ClassificationTask,
    params: Params,
    splits: tuple[Batch, Batch, Batch],
    eigenpairs: Eigenpairs,
) -> None:
    """project(θ, G, batch) is the (B, p̃) matrix ∇ℓ(x_i)ᵀ G_jᵀ: the JVPs along the eigenvectors
    equal the explicit per-example gradients projected on them."""
    _, train, _ = splits
    project = jax.jit(scoring.make_forward_products(task.per_example_loss))
    got = np.asarray(project(params, eigenpairs.eigvecs, train))
    assert got.shape == (NUM_TRAIN, TOP_K) and got.dtype == np.float32
    want = per_example_gradients(task, params, train) @ eigvec_matrix(eigenpairs).T
    print(f"\nmax |Δg| / max |g| = {np.abs(got - want).max() / np.abs(want).max():.2e}")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=scale_atol(want))


def test_reverse_mode_equals_forward_mode(
    task: ClassificationTask,
    params: Params,
    splits: tuple[Batch, Batch, Batch],
    eigenpairs: Eigenpairs,
) -> None:
    """Per-example gradients and one GEMM give the JVPs' projections and the explicit
    ∇ℓ(x_i)ᵀ G_jᵀ (rtol 1e-4)."""
    _, train, _ = splits
    forward = jax.jit(scoring.make_forward_products(task.per_example_loss))
    reverse = jax.jit(scoring.make_reverse_products(task.per_example_loss))
    want = np.asarray(forward(params, eigenpairs.eigvecs, train))
    got = np.asarray(reverse(params, eigenpairs.eigvecs, train))
    assert got.shape == want.shape == (NUM_TRAIN, TOP_K) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=scale_atol(want))
    explicit = per_example_gradients(task, params, train) @ eigvec_matrix(eigenpairs).T
    np.testing.assert_allclose(got, explicit, rtol=1e-4, atol=scale_atol(explicit))


def test_tangent_chunk_matches_unchunked(
    task: ClassificationTask,
    params: Params,
    splits: tuple[Batch, Batch, Batch],
    eigenpairs: Eigenpairs,
) -> None:
    """``tangent_chunk=2`` (lax.map over p̃ = 5 tangents in chunks of 2, one ragged) gives the same
    projections as one vmap over all tangents."""
    _, train, _ = splits
    full = jax.jit(scoring.make_forward_products(task.per_example_loss))(
        params, eigenpairs.eigvecs, train
    )
    chunked = jax.jit(scoring.make_forward_products(task.per_example_loss, tangent_chunk=2))(
        params, eigenpairs.eigvecs, train
    )
    assert chunked.shape == full.shape == (NUM_TRAIN, TOP_K)
    np.testing.assert_allclose(
        np.asarray(chunked), np.asarray(full), rtol=1e-6, atol=scale_atol(np.asarray(full), 1e-7)
    )


def test_self_influence_and_influence_match_explicit_quadratic_forms(
    task: ClassificationTask,
    params: Params,
    splits: tuple[Batch, Batch, Batch],
    eigenpairs: Eigenpairs,
) -> None:
    """End to end from the projector: self_influence(x) = ∇ℓ(x)ᵀ Gᵀ diag(1/λ) G ∇ℓ(x) and
    influence(x, z) = ∇ℓ(x)ᵀ Gᵀ diag(1/λ) G ∇ℓ(z), with ∇ℓ the explicit per-example gradients."""
    _, train, test = splits
    project = jax.jit(scoring.make_forward_products(task.per_example_loss))
    eigvals = jnp.asarray(eigenpairs.eigvals, jnp.float32)
    g_train = project(params, eigenpairs.eigvecs, train)
    g_test = project(params, eigenpairs.eigvecs, test)

    g = eigvec_matrix(eigenpairs)
    inverse = g.T @ np.diag(1.0 / eigenpairs.eigvals) @ g  # (P, P) low-rank H⁻¹
    grads_train = per_example_gradients(task, params, train)
    grads_test = per_example_gradients(task, params, test)
    want_self = np.einsum("ip,pq,iq->i", grads_train, inverse, grads_train)
    want_cross = grads_train @ inverse @ grads_test.T

    got_self = np.asarray(scoring.self_influence(g_train, eigvals))
    got_cross = np.asarray(scoring.influence(g_train, g_test, eigvals))
    assert got_self.shape == (NUM_TRAIN,)
    assert got_cross.shape == (NUM_TRAIN, NUM_TEST)
    print(
        f"\nself-influence max rel err {np.max(np.abs(got_self - want_self) / np.abs(want_self)):.2e}"
        f"; influence max |Δ| / max |I| "
        f"{np.abs(got_cross - want_cross).max() / np.abs(want_cross).max():.2e}"
    )
    # Self-influence with λ of mixed sign is a sum of mixed-sign terms too: same atol rationale.
    np.testing.assert_allclose(got_self, want_self, rtol=1e-4, atol=scale_atol(want_self))
    np.testing.assert_allclose(got_cross, want_cross, rtol=1e-4, atol=scale_atol(want_cross))
    # influence(x, x) is self-influence.
    np.testing.assert_allclose(
        np.diag(np.asarray(scoring.influence(g_train, g_train, eigvals))), got_self, rtol=1e-5
    )


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_influential_matches_argsort(k: int) -> None:
    """top_influential returns, per test column, the k largest training scores in decreasing order,
    the same indices and values as a numpy argsort; ``-scores`` gives the opponents."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(10, 4)).astype(np.float32)  # continuous: no ties
    indices, values = scoring.top_influential(jnp.asarray(scores), k)
    assert indices.shape == values.shape == (4, k)
    want_indices = np.argsort(-scores.T, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.asarray(indices), want_indices)
    np.testing.assert_array_equal(np.asarray(values), np.take_along_axis(scores.T, want_indices, 1))

    opponents, _ = scoring.top_influential(-jnp.asarray(scores), k)
    np.testing.assert_array_equal(np.asarray(opponents), np.argsort(scores.T, axis=1)[:, :k])


def test_tail_corrected_scores_match_the_explicit_inverse_with_an_isotropic_complement(
    task: ClassificationTask,
    params: Params,
    splits: tuple[Batch, Batch, Batch],
    eigenpairs: Eigenpairs,
) -> None:
    """With the tail, self-influence and train → test influence are the quadratic forms of
    Gᵀ diag(1/λ) G + (I − GᵀG)/σ over explicit per-example gradients, fed with what the score job
    computes: ‖∇ℓ(x)‖² from the factorised reverse pass (``sqnorm``) and ⟨∇ℓ(x), ∇ℓ(z)⟩ as the
    projections onto the query gradients (``jit_example_grads``' layout, stacked like G)."""
    _, train, test = splits
    sigma = 0.37
    eigvals = jnp.asarray(eigenpairs.eigvals, jnp.float32)
    project = jax.jit(scoring.make_forward_products(task.per_example_loss))
    g_train = project(params, eigenpairs.eigvecs, train)
    g_test = project(params, eigenpairs.eigvecs, test)
    with_norm = jax.jit(factorised.make_factorised_products(task.per_example_loss, sqnorm=True))
    sqnorm = with_norm(params, eigenpairs.eigvecs, train)[:, -1]
    mesh = make_mesh(1, 1, 1)
    param_sh = jax.tree.map(lambda _: sharding.replicated(mesh), params)
    query_grads = programs.jit_example_grads(task.per_example_loss, param_sh, param_sh, mesh)(
        params, test
    )
    dots = project(params, query_grads, train)

    g = eigvec_matrix(eigenpairs)
    grads_train = per_example_gradients(task, params, train)
    grads_test = per_example_gradients(task, params, test)
    inverse = g.T @ np.diag(1.0 / eigenpairs.eigvals) @ g + (np.eye(g.shape[1]) - g.T @ g) / sigma
    want_self = np.einsum("ip,pq,iq->i", grads_train, inverse, grads_train)
    want_cross = grads_train @ inverse @ grads_test.T

    np.testing.assert_allclose(np.asarray(sqnorm), (grads_train**2).sum(1), rtol=1e-5)
    got_self = np.asarray(scoring.self_influence(g_train, eigvals, sqnorm, sigma))
    got_cross = np.asarray(scoring.influence(g_train, g_test, eigvals, dots, sigma))
    np.testing.assert_allclose(got_self, want_self, rtol=1e-4, atol=scale_atol(want_self))
    np.testing.assert_allclose(got_cross, want_cross, rtol=1e-4, atol=scale_atol(want_cross))
    # Without the tail the same call is the plain score.
    np.testing.assert_array_equal(
        np.asarray(scoring.self_influence(g_train, eigvals, sqnorm, None)),
        np.asarray(scoring.self_influence(g_train, eigvals)),
    )


def test_tail_sigma_rules() -> None:
    """damping: l2 + damping; ritz: the harmonic mean of the positive Ritz values outside the
    top p̃ by |λ|, + damping; a σ that is not positive is a one-line error naming the fix."""
    ritz = np.array([10.0, -8.0, 4.0, 2.0, -0.5, 1.0])
    assert scoring.tail_sigma("none", l2=1e-3, damping=0.0, ritz_values=ritz, top_k=2) is None
    assert scoring.tail_sigma("damping", l2=1e-3, damping=0.01, ritz_values=[], top_k=2) == (
        pytest.approx(0.011)
    )
    # Beyond the top 2 by |λ| (10, -8): 4, 2, -0.5, 1 → positive 4, 2, 1 → 3 / (1/4 + 1/2 + 1).
    assert scoring.tail_sigma("ritz", l2=0.0, damping=0.5, ritz_values=ritz, top_k=2) == (
        pytest.approx(3 / 1.75 + 0.5)
    )
    with pytest.raises(ValueError, match=r"distill\.damping"):
        scoring.tail_sigma("damping", l2=0.0, damping=0.0, ritz_values=ritz, top_k=2)
    with pytest.raises(ValueError, match=r"raise arnoldi\.num_iters"):
        scoring.tail_sigma("ritz", l2=0.0, damping=0.0, ritz_values=ritz[:2], top_k=2)
