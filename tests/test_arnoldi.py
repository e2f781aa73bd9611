"""Arnoldi iteration (influence/krylov.py) and distillation (influence/distill.py) against exact
linear algebra: orthonormal basis, the Arnoldi relation, Ritz pairs vs. the explicit Hessian's
eigenpairs, breakdown on a low-rank problem, and bitwise determinism."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from threadpoolctl import threadpool_limits

from influence import distill, krylov
from influence.hvp import make_hvp
from influence.types import Batch, Params, PerExampleLoss
from tasks import mnist
from tasks.base import ClassificationTask
from tasks.sources import read_all

L2 = 1e-3
NUM_TRAIN = 1000
HESSIAN_BATCH = 128
# Examples per jax.hessian call: on CPU, chunks of 8 are ~1.5x faster than chunks of 32 and ~3x
# faster than one call on the whole batch (measured on 256 examples: 13 s vs 20 s vs 42 s, 2 cores).
# The 128-example batch keeps the acceptance test ~10 s on an idle 2-core machine (256: ~17 s).
HESSIAN_CHUNK = 8


ORTHOGONALIZATIONS = sorted(krylov.ORTHOGONALIZATION)


def make_step(loss: PerExampleLoss, l2: float, orthogonalization: str = "mgs2") -> krylov.StepFn:
    """The jitted Arnoldi step on the HVP of mean loss + (l2/2)‖θ‖², default breakdown_tol."""
    return jax.jit(
        functools.partial(
            krylov.arnoldi_step, make_hvp(loss, l2), orthogonalization=orthogonalization
        )
    )


def run(
    loss: PerExampleLoss,
    l2: float,
    params: Params,
    batch: Batch,
    num_iters: int,
    seed: int = 0,
    step: krylov.StepFn | None = None,
    orthogonalization: str = "mgs2",
) -> krylov.ArnoldiResult:
    """Arnoldi on a fixed batch, the way the pipeline drives it (jitted step, Python outer loop).

    A fresh step is jitted (and compiled) unless an existing ``step`` is passed.
    """
    if step is None:
        step = make_step(loss, l2, orthogonalization)
    # Jitted as in parallel/programs.py: eager, each leaf's random draw compiles separately (~6 s).
    state = jax.jit(krylov.init_state, static_argnums=1)(params, num_iters, jax.random.key(seed))
    return krylov.run_arnoldi(step, state, params, lambda k: batch, num_iters)


def flatten_rows(stacked: Params) -> np.ndarray:
    """A stacked pytree (leaves (m, ...)) as an (m, num_params) float64 matrix, ravel_pytree order."""
    rows = jax.vmap(lambda tree: ravel_pytree(tree)[0])(stacked)
    return np.asarray(rows, np.float64)


def arnoldi_row(stacked: Params, k: int) -> Params:
    """Row k of a stacked pytree, as a params-shaped pytree."""
    return jax.tree.map(lambda s: s[k], stacked)


def explicit_hessian(
    loss: PerExampleLoss, l2: float, params: Params, batch: Batch, chunk: int
) -> np.ndarray:
    """∇² of mean_i ℓ(θ, x_i) + (l2/2)‖θ‖² on the flattened θ, by ``jax.hessian``, symmetrised.

    Built independently of ``influence.hvp``: the L2 term is differentiated, not added. The batch
    is split into equal chunks and the chunk Hessians averaged (exact by linearity; each chunk's
    objective carries the full L2 term, so their mean does too).
    """
    flat, unravel = ravel_pytree(params)
    size = batch["label"].shape[0]
    assert size % chunk == 0

    def objective(x: jax.Array, b: Batch) -> jax.Array:
        return jnp.mean(loss(unravel(x), b)) + 0.5 * l2 * jnp.sum(x * x)

    hessian_fn = jax.jit(jax.hessian(objective))
    total = np.zeros((flat.size, flat.size), np.float64)
    for start in range(0, size, chunk):
        part = {k: v[start : start + chunk] for k, v in batch.items()}
        total += np.asarray(hessian_fn(flat, part), np.float64)
    total /= size // chunk
    return 0.5 * (total + total.T)


@pytest.fixture(scope="module")
def task() -> ClassificationTask:
    return mnist.make_task("small_cnn")


@pytest.fixture(scope="module")
def data() -> Batch:
    train = read_all(
        mnist.load_splits(num_train=NUM_TRAIN, num_eval=0, flip_fraction=0.2, seed=0)[0]
    )
    return {"image": jnp.asarray(train["image"]), "label": jnp.asarray(train["label"])}


@pytest.fixture(scope="module")
def trained_params(task: ClassificationTask, data: Batch) -> Params:
    """Small CNN after 100 full-batch Adam(1e-2) steps on 1,000 MNIST examples with the L2 term:
    away from initialisation the Hessian has a spread-out, well-separated top spectrum."""
    optimizer = optax.adam(1e-2)

    def objective(params: Params) -> jax.Array:
        l2_term = 0.5 * L2 * sum(jnp.sum(x * x) for x in jax.tree.leaves(params))
        return jnp.mean(task.per_example_loss(params, data)) + l2_term

    @jax.jit
    def train_step(params: Params, opt_state: optax.OptState) -> tuple[Params, optax.OptState]:
        grads = jax.grad(objective)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = task.init_params(jax.random.key(0))
    opt_state = optimizer.init(params)
    for _ in range(100):
        params, opt_state = train_step(params, opt_state)
    return params


@pytest.mark.slow
@pytest.mark.parametrize("orthogonalization", ORTHOGONALIZATIONS)
def test_basis_orthonormal_and_arnoldi_relation(
    task: ClassificationTask, data: Batch, trained_params: Params, orthogonalization: str
) -> None:
    """After n = 30 steps the basis q_0 … q_n is orthonormal and H Q_n = Q_{n+1} H̃ column by column,
    i.e. the Hessenberg matrix really is the Hessian restricted to the Krylov space."""
    n = 30
    batch = {k: v[:64] for k, v in data.items()}
    result = run(task.per_example_loss, L2, trained_params, batch, n, 3, None, orthogonalization)
    assert result.num_completed == n and result.breakdown is None

    basis = result.state["krylov_basis"]
    q = flatten_rows(basis)  # (n + 1, P)
    gram = q @ q.T
    print(f"\nmax |Q Qᵀ − I| = {np.abs(gram - np.eye(n + 1)).max():.2e}")
    np.testing.assert_allclose(gram, np.eye(n + 1), rtol=0, atol=1e-5)

    hvp = jax.jit(make_hvp(task.per_example_loss, L2))
    hq = np.stack(
        [
            np.asarray(ravel_pytree(hvp(trained_params, batch, arnoldi_row(basis, k)))[0])
            for k in range(n)
        ]
    ).astype(np.float64)  # (n, P): row k is H q_k
    hessenberg = np.asarray(result.state["hessenberg"], np.float64)  # (n + 1, n)
    assert np.all(np.tril(hessenberg, -2) == 0), "H̃ must be upper Hessenberg"
    rebuilt = hessenberg.T @ q  # row k: Σ_j h̃_{jk} q_j
    rel = np.linalg.norm(hq - rebuilt, axis=1) / np.linalg.norm(hq, axis=1)
    print(f"max_k ‖H q_k − Q_(n+1) h̃_k‖ / ‖H q_k‖ = {rel.max():.2e}")
    assert rel.max() <= 1e-4


@pytest.fixture(scope="module")
def exact_hessian(
    task: ClassificationTask, data: Batch, trained_params: Params
) -> tuple[np.ndarray, np.ndarray]:
    """The explicit Hessian on the fixed acceptance batch and its eigenvalues by decreasing |λ|."""
    batch = {k: v[:HESSIAN_BATCH] for k, v in data.items()}
    hessian = explicit_hessian(task.per_example_loss, L2, trained_params, batch, HESSIAN_CHUNK)
    # One BLAS thread: on a busy 2-core machine multi-threaded OpenBLAS eigvalsh of this matrix takes
    # ~10 s instead of ~1 s (spinning threads fight XLA's and other processes' for the cores).
    with threadpool_limits(limits=1, user_api="blas"):
        exact = np.linalg.eigvalsh(hessian)
    return hessian, exact[np.argsort(-np.abs(exact))]


@pytest.mark.slow
@pytest.mark.parametrize("orthogonalization", ORTHOGONALIZATIONS)
def test_ritz_pairs_match_explicit_hessian(
    task: ClassificationTask,
    data: Batch,
    trained_params: Params,
    exact_hessian: tuple[np.ndarray, np.ndarray],
    orthogonalization: str,
) -> None:
    """Acceptance test: 100 Arnoldi steps + distill recover the top-10 (by |λ|) eigenpairs of the
    explicit 2,410 × 2,410 Hessian of the trained small CNN on a fixed 128-example batch with L2:
    eigenvalues to 1e-3 relative (top 5: 1e-4) and ‖H v − λ v‖ / |λ| ≤ 1e-2 for each pair."""
    n, top_k = 100, 10
    batch = {k: v[:HESSIAN_BATCH] for k, v in data.items()}
    hessian, exact = exact_hessian
    exact = exact[:top_k]

    result = run(task.per_example_loss, L2, trained_params, batch, n, 1, None, orthogonalization)
    assert result.num_completed == n and result.breakdown is None
    pairs = distill.distill(
        np.asarray(result.state["hessenberg"]),
        result.state["krylov_basis"],
        result.num_completed,
        top_k=top_k,
    )
    assert pairs.eigvals.shape == (top_k,)
    assert np.all(np.diff(np.abs(pairs.eigvals)) <= 0), "pairs must be ordered by decreasing |λ|"

    eig_rel = np.abs(pairs.eigvals - exact) / np.abs(exact)
    vectors = flatten_rows(pairs.eigvecs)  # (top_k, P)
    residual_rel = np.linalg.norm(
        vectors @ hessian - pairs.eigvals[:, None] * vectors, axis=1
    ) / np.abs(pairs.eigvals)
    print(f"\nexact top-{top_k} |λ|:   {np.array2string(exact, precision=5)}")
    print(f"eigenvalue rel. error:  {np.array2string(eig_rel, precision=2)}")
    print(f"‖Hv − λv‖ / |λ|:        {np.array2string(residual_rel, precision=2)}")
    print(f"Ritz residual estimate: {np.array2string(pairs.ritz_residuals, precision=2)}")

    np.testing.assert_allclose(vectors @ vectors.T, np.eye(top_k), rtol=0, atol=1e-5)
    assert eig_rel.max() <= 1e-3
    assert eig_rel[:5].max() <= 1e-4
    assert residual_rel.max() <= 1e-2


def test_bfloat16_basis_keeps_the_top_eigenvalues(
    task: ClassificationTask,
    data: Batch,
    trained_params: Params,
    exact_hessian: tuple[np.ndarray, np.ndarray],
) -> None:
    """arnoldi.basis_dtype=bfloat16: the basis is stored in bfloat16 (half the bytes), every dot
    product and update accumulates in float32 and the Hessenberg matrix is float32. On the small
    CNN's explicit Hessian (as above, 60 steps) the top-5 eigenvalues stay within 5e-4 relative
    (3.8e-5 measured) and the basis orthonormal within bfloat16's resolution, 2⁻⁸ (7.7e-4)."""
    n, top_k = 60, 5
    batch = {k: v[:HESSIAN_BATCH] for k, v in data.items()}
    exact = exact_hessian[1][:top_k]
    like = jax.tree.map(lambda x: x.astype(jnp.bfloat16), trained_params)  # shapes and dtypes
    state = jax.jit(krylov.init_state, static_argnums=1)(like, n, jax.random.key(1))
    step = make_step(task.per_example_loss, L2)
    result = krylov.run_arnoldi(step, state, trained_params, lambda k: batch, n)
    basis = result.state["krylov_basis"]
    assert {x.dtype for x in jax.tree.leaves(basis)} == {jnp.dtype(jnp.bfloat16)}
    assert result.state["hessenberg"].dtype == jnp.float32
    assert result.num_completed == n and result.breakdown is None
    q = flatten_rows(basis)[: n + 1]
    gram_error = np.abs(q @ q.T - np.eye(n + 1)).max()
    pairs = distill.distill(np.asarray(result.state["hessenberg"]), basis, n, top_k=top_k)
    assert {x.dtype for x in jax.tree.leaves(pairs.eigvecs)} == {jnp.dtype(jnp.float32)}
    eig_rel = np.abs(pairs.eigvals - exact) / np.abs(exact)
    print(f"\nbfloat16 basis: max |QᵀQ − I| {gram_error:.1e}, top-{top_k} rel. error {eig_rel}")
    assert gram_error <= 2.0**-8
    assert eig_rel.max() <= 5e-4


@pytest.mark.parametrize(
    ("dim", "seed"),
    [(6, 0), (6, 1), (6, 2), (50, 0)],
    ids=["dim6-seed0", "dim6-seed1", "dim6-seed2", "dim50-seed0"],
)
def test_breakdown_on_low_rank_hessian(dim: int, seed: int) -> None:
    """When H has rank r < n the Krylov space is invariant after r + 1 steps (q_0 has a component
    outside range(H), H q_0 … H^r q_0 span range(H)): the Ritz values are the nonzero eigenvalues of
    H and the run stops early, with a reason, after at most r + 1 iterations.

    Uses the library's default ``breakdown_tol``: the residual of the exactly invariant step r is
    HVP round-off, 1e-7 … 1e-5 of ‖H q_r‖ in float32. A tolerance at float32 eps (1e-7) detects it
    late (dim 6: a 1-ulp change in q_0 decides whether step r or step r + 2 trips it) or never
    (dim 50); this test is what pins the default above the round-off.
    """
    rank, num_iters = 3, 8
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, rank)))
    nonzero = np.array([3.0, 2.0, 0.5])
    a = jnp.asarray(basis @ np.diag(nonzero) @ basis.T, jnp.float32)  # rank-3 PSD

    def quadratic_loss(params: Params, batch: Batch) -> jax.Array:
        """ℓ = ½ xᵀ A x for every example (the batch only sets the shape); x spans two leaves."""
        x = jnp.concatenate([params["a"], params["b"]])
        return jnp.full(batch["label"].shape, 0.5 * x @ a @ x)

    params = {"a": jnp.zeros(2, jnp.float32), "b": jnp.zeros(dim - 2, jnp.float32)}
    batch = {"label": jnp.zeros(4, jnp.int32)}
    result = run(quadratic_loss, 0.0, params, batch, num_iters, seed=seed)
    hessenberg = np.asarray(result.state["hessenberg"], np.float64)
    print(f"\nnum_completed={result.num_completed}, breakdown={result.breakdown!r}")

    pairs = distill.distill(hessenberg, result.state["krylov_basis"], result.num_completed, rank)
    np.testing.assert_allclose(pairs.eigvals, nonzero, rtol=1e-5)
    vectors = flatten_rows(pairs.eigvecs)
    np.testing.assert_allclose(
        vectors @ np.asarray(a, np.float64), nonzero[:, None] * vectors, atol=1e-5
    )

    assert result.breakdown is not None, "an invariant Krylov subspace was not detected"
    assert result.num_completed <= rank + 1, "breakdown detected late"

    # run_arnoldi learnt of the breakdown one step late: the step it had dispatched meanwhile was
    # a no-op, so its state is bit for bit that of exactly num_completed steps, and the state
    # itself records where it broke down (what a resumed run reads).
    step = make_step(quadratic_loss, 0.0)
    exact = jax.jit(krylov.init_state, static_argnums=1)(params, num_iters, jax.random.key(seed))
    for k in range(result.num_completed):
        exact, _ = step(exact, params, batch, jnp.asarray(k, jnp.int32))
    for got, want in zip(jax.tree.leaves(result.state), jax.tree.leaves(exact), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert krylov.completed_iterations(hessenberg, num_iters) == result.num_completed


@pytest.mark.slow
def test_same_key_is_bitwise_deterministic(task: ClassificationTask, data: Batch) -> None:
    """Two runs from the same key on the same data give bitwise-identical Hessenberg matrices and
    bases, even from two separately compiled steps (what makes a repeated or resumed pipeline run
    reproducible); another key does not."""
    params = task.init_params(jax.random.key(0))
    batch = {k: v[:32] for k, v in data.items()}
    first = run(task.per_example_loss, L2, params, batch, 10, seed=7)
    step = make_step(task.per_example_loss, L2)
    second = run(task.per_example_loss, L2, params, batch, 10, seed=7, step=step)
    other = run(task.per_example_loss, L2, params, batch, 10, seed=8, step=step)
    np.testing.assert_array_equal(
        np.asarray(first.state["hessenberg"]), np.asarray(second.state["hessenberg"])
    )
    for x, y in zip(
        jax.tree.leaves(first.state["krylov_basis"]),
        jax.tree.leaves(second.state["krylov_basis"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(
        np.asarray(first.state["hessenberg"]), np.asarray(other.state["hessenberg"])
    )


def test_negative_mass_fraction_of_the_top_ritz_values() -> None:
    """Of the top-3 by |λ| of (5, -3, 1, -0.5): |−3| / (5 + 3 + 1); none negative: 0."""
    from methods.arnoldi import negative_mass_fraction

    assert negative_mass_fraction(np.array([1.0, -0.5, 5.0, -3.0]), 3) == pytest.approx(1 / 3)
    assert negative_mass_fraction(np.array([2.0, 1.0, -0.1]), 2) == 0.0


def _noisy_diagonal_arnoldi(num_iters: int) -> tuple[float, np.ndarray]:
    """(max|QᵀQ − I|, reorthogonalized flags) of ``dgks`` Arnoldi on a diagonal operator with
    eigenvalues 1/i (2,000 of them, in a two-leaf pytree) scaled by fresh seeded noise in every
    iteration, as a fresh HVP batch perturbs the Hessian. The top Ritz values converge within a
    few dozen steps, so a single Gram–Schmidt pass loses orthogonality; the noise puts new
    directions into H q_k, so some first passes cancel little."""
    eigvals = 1.0 / np.arange(1, 2001)
    diag = {"a": jnp.asarray(eigvals[:1500]), "b": jnp.asarray(eigvals[1500:]).reshape(25, 20)}

    def hvp(_params: Params, k: jax.Array, v: Params) -> Params:
        keys = dict(
            zip(diag, jax.random.split(jax.random.fold_in(jax.random.key(1), k)), strict=True)
        )
        noisy = {name: d * (1 + jax.random.normal(keys[name], d.shape)) for name, d in diag.items()}
        return jax.tree.map(jnp.multiply, noisy, v)

    step = jax.jit(functools.partial(krylov.arnoldi_step, hvp, orthogonalization="dgks"))
    state = krylov.init_state(diag, num_iters, jax.random.key(0))
    flags = []
    for k in range(num_iters):
        k = jnp.asarray(k, jnp.int32)
        state, info = step(state, diag, k, k)
        flags.append(bool(info["reorthogonalized"]))
    q = flatten_rows(state["krylov_basis"])
    return float(np.abs(q @ q.T - np.eye(num_iters + 1)).max()), np.array(flags)


@pytest.mark.slow
def test_dgks_reorthogonalizes_only_when_the_first_pass_cancels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``dgks`` keeps the basis orthonormal to float32 round-off while skipping the second pass in
    some steps and taking it in others; with the second pass never taken (η = 0) the same problem
    loses orthogonality, so the criterion is what keeps it."""
    loss, flags = _noisy_diagonal_arnoldi(80)
    print(f"\ndgks: max|QᵀQ − I| = {loss:.2e}, second pass in {flags.mean():.0%} of steps")
    assert loss <= 1e-5
    assert 0 < flags.sum() < len(flags)
    monkeypatch.setattr(krylov, "DGKS_ETA", 0.0)
    loss_one_pass, flags = _noisy_diagonal_arnoldi(80)
    print(f"one pass: max|QᵀQ − I| = {loss_one_pass:.2e}")
    assert not flags.any()
    assert loss_one_pass > 1e-3
