"""``influence.hvp.make_hvp`` against the explicit Hessian of the small CNN on real MNIST."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from influence.hvp import make_hvp, make_mean_loss
from influence.types import Batch, Params
from tasks import mnist
from tasks.base import ClassificationTask
from tasks.sources import read_all

NUM_VECTORS = 4


@pytest.fixture(scope="module")
def task() -> ClassificationTask:
    return mnist.make_task("small_cnn")


@pytest.fixture(scope="module")
def params(task: ClassificationTask) -> Params:
    return task.init_params(jax.random.key(0))


@pytest.fixture(scope="module")
def batch() -> Batch:
    """32 real MNIST training examples, a fifth of them with flipped labels."""
    train = read_all(mnist.load_splits(num_train=64, num_eval=0, flip_fraction=0.2, seed=0)[0])
    return {"image": jnp.asarray(train["image"][:32]), "label": jnp.asarray(train["label"][:32])}


@pytest.fixture(scope="module")
def data_hessian(task: ClassificationTask, params: Params, batch: Batch) -> np.ndarray:
    """``jax.hessian`` of the flattened mean loss mean_i ℓ(θ, x_i), float32, computed independently
    of ``influence.hvp``.

    Averaging the Hessians of 4 chunks of 8 examples is the Hessian of the mean by linearity, and
    ~1.5x faster on CPU than one call on all 32 examples.
    """
    flat, unravel = ravel_pytree(params)

    def mean_loss(x: jax.Array, part: Batch) -> jax.Array:
        return jnp.mean(task.per_example_loss(unravel(x), part))

    hessian_fn = jax.jit(jax.hessian(mean_loss))
    size, chunk = batch["label"].shape[0], 8
    hessian = sum(
        hessian_fn(flat, {k: v[i : i + chunk] for k, v in batch.items()})
        for i in range(0, size, chunk)
    ) / (size // chunk)
    assert hessian.dtype == jnp.float32 and hessian.shape == (flat.size, flat.size)
    return np.asarray(hessian)


def l2_hessian(params: Params, l2: float) -> np.ndarray:
    """``jax.hessian`` of (l2/2)‖θ‖² on the flattened θ: differentiated, not assumed to be l2 · I.
    Added to ``data_hessian`` it is the Hessian of the full objective, by linearity."""
    flat, _ = ravel_pytree(params)
    return np.asarray(jax.hessian(lambda x: 0.5 * l2 * jnp.sum(x * x))(flat))


def test_small_cnn_size(params: Params) -> None:
    """The Koh & Liang CNN has the 2,410 parameters the explicit-Hessian tests rely on."""
    assert ravel_pytree(params)[0].size == 2410


@pytest.mark.slow
@pytest.mark.parametrize("l2", [0.0, 1e-3])
def test_hvp_equals_explicit_hessian_times_v(
    task: ClassificationTask, params: Params, batch: Batch, data_hessian: np.ndarray, l2: float
) -> None:
    """hvp(θ, batch, v) = ∇²L(θ) v for random v, with L the mean loss plus (l2/2)‖θ‖² — the operator
    Arnoldi runs on is the Hessian of the objective ``make_mean_loss`` defines."""
    flat, unravel = ravel_pytree(params)
    hessian = data_hessian + l2_hessian(params, l2)
    vectors = jax.random.normal(jax.random.key(1), (NUM_VECTORS, flat.size), jnp.float32)

    hvp = jax.jit(make_hvp(task.per_example_loss, l2))
    got = np.stack([np.asarray(ravel_pytree(hvp(params, batch, unravel(v)))[0]) for v in vectors])
    assert got.dtype == np.float32
    want = np.asarray(vectors) @ hessian.T  # float32, like the HVP

    # Both sides are float32 sums over ~2,410 products of mixed sign, so each entry carries
    # round-off of order eps_f32 · Σ_j |H_ij v_j|, not eps · |(H v)_i|: entries that nearly cancel
    # cannot meet a pure rtol. atol = 1e-5 · max|H v| bounds that absolute round-off (the same
    # relative accuracy as the rtol, measured against the vector's scale).
    atol = 1e-5 * np.abs(want).max()
    err = np.abs(got - want)
    print(f"\nentries outside rtol=1e-5 alone: {(err > 1e-5 * np.abs(want)).sum()} / {err.size}")
    print(f"l2={l2}: max |Δ| / max |Hv| = {err.max() / np.abs(want).max():.2e}")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)

    # The same objective, value-wise: make_mean_loss is what the HVP differentiates.
    mean_loss = make_mean_loss(task.per_example_loss, l2)
    want_loss = jnp.mean(task.per_example_loss(params, batch)) + 0.5 * l2 * jnp.sum(flat * flat)
    np.testing.assert_allclose(mean_loss(params, batch), want_loss, rtol=1e-6)


def test_l2_adds_exactly_l2_times_v(task: ClassificationTask, params: Params, batch: Batch) -> None:
    """hvp_l2(v) − hvp_0(v) = l2 · v: the regulariser adds exactly l2 · I to the Hessian."""
    flat, unravel = ravel_pytree(params)
    v = unravel(jax.random.normal(jax.random.key(2), flat.shape, jnp.float32))
    l2 = 1e-3
    with_l2 = ravel_pytree(jax.jit(make_hvp(task.per_example_loss, l2))(params, batch, v))[0]
    without = ravel_pytree(jax.jit(make_hvp(task.per_example_loss, 0.0))(params, batch, v))[0]
    np.testing.assert_allclose(
        with_l2 - without, l2 * ravel_pytree(v)[0], rtol=0, atol=1e-6 * np.abs(with_l2).max()
    )
