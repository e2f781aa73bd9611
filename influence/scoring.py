"""Influence scores from projections onto the distilled eigenvectors: Algorithm 1, lines 19–27.

For an example x, g(x) = G ∇ℓ(x) ∈ R^p̃ are the directional derivatives of its loss along the p̃
distilled eigenvectors: from JVPs (``make_forward_products``, one linearisation vmapped over the p̃
tangents, no per-example gradient materialised) or from per-example gradients and one GEMM
(``make_reverse_products``; ``influence/factorised.py`` for dense and conv layers). Then

    self-influence   I(x, x) ≈ Σ_i g_i(x)² / λ_i               (line 24)
    train → test     I(x, z) ≈ ⟨g(x) / λ, g(z)⟩               (line 26)

the low-rank approximation of ⟨∇ℓ(z), H⁻¹ ∇ℓ(x)⟩ restricted to the top-p̃ eigenspace of H, and,
with a tail (``tail_sigma``), the complement of that space added back at curvature σ.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from influence.selection import Selection, restricted
from influence.types import Batch, Params, PerExampleLoss

Products = Callable[[Params, Params, Batch], jax.Array]


def make_forward_products(
    per_example_loss: PerExampleLoss,
    tangent_chunk: int | None = None,
    selection: Selection | None = None,
) -> Products:
    """Return ``project(params, eigvecs, batch) -> (batch_size, p̃)`` matrix of g(x).

    With a ``selection`` the eigenvectors span the selected leaves only and ``params`` is the
    full tree (``influence/selection.py``).

    ``jax.linearize`` evaluates the forward pass once and keeps its residuals; the linear map is then
    vmapped over the stacked eigenvectors, so all p̃ directions are done in one call. With
    ``tangent_chunk`` the p̃ tangents go through ``lax.map`` in chunks, bounding activation memory at
    chunk × batch instead of p̃ × batch.
    """

    def project(params: Params, eigvecs: Params, batch: Batch) -> jax.Array:
        loss, primal = restricted(per_example_loss, params, selection)
        _, jvp_fn = jax.linearize(lambda p: loss(p, batch), primal)
        if tangent_chunk is None:
            g = jax.vmap(jvp_fn)(eigvecs)
        else:
            g = jax.lax.map(jvp_fn, eigvecs, batch_size=tangent_chunk)
        return jnp.swapaxes(g, 0, 1).astype(jnp.float32)

    return project


def example_grads(
    per_example_loss: PerExampleLoss,
    params: Params,
    batch: Batch,
    selection: Selection | None = None,
) -> Params:
    """∇ℓ(x) of every example of ``batch`` over the ``selection``'s leaves, stacked: a pytree of
    (rows, *leaf.shape) arrays (``vmap`` of ``grad``, each example a batch of one)."""
    loss, primal = restricted(per_example_loss, params, selection)

    def grad(example: Batch) -> Params:
        one = jax.tree.map(lambda x: x[None], example)
        return jax.grad(lambda p: loss(p, one)[0])(primal)

    return jax.vmap(grad)(batch)


def make_reverse_products(
    per_example_loss: PerExampleLoss, selection: Selection | None = None
) -> Products:
    """The same ``project(params, eigvecs, batch) -> (batch_size, p̃)`` in reverse mode: the
    per-example gradients ∇ℓ(x) (``vmap`` of ``grad`` over examples), then g = G ∇ℓ(x) for all
    rows at once: one (rows × P) · (P × p̃) GEMM, summed over the leaves.

    Cost: about one forward + backward pass per example plus the p̃ × P product, whatever p̃; it
    holds rows × P gradient values, so it is the mode for large p̃ on models whose per-example
    gradients fit, and forward mode (``make_forward_products``) is the one for models too large for that.
    Memory is bounded by calling it on fewer rows (``parallel/products.py`` splits a batch into
    calls), not by ``lax.map`` inside: on the Flax CNN (2 CPU cores, p̃ = 100) a ``lax.map`` over
    chunks of 64 ran 3.7× slower than separate calls of 64 rows, and contracting inside the
    vmapped row function 1.5× slower than this materialise-then-GEMM form.
    """

    def project(params: Params, eigvecs: Params, batch: Batch) -> jax.Array:
        grads = example_grads(per_example_loss, params, batch, selection)
        return sum(
            jnp.tensordot(g.reshape(g.shape[0], -1), v.reshape(v.shape[0], -1), axes=(1, 1))
            for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(eigvecs), strict=True)
        ).astype(jnp.float32)

    return project


MODES = ("forward", "reverse")
TAILS = ("none", "damping", "ritz")


def tail_sigma(
    tail: str, *, l2: float, damping: float, ritz_values: np.ndarray, top_k: int
) -> float | None:
    """σ of the tail term: the curvature assumed on the complement of the top-p̃ eigenspace.

    The truncation keeps H⁻¹ on span(G) only, but H⁻¹ is dominated by its many small eigenvalues
    (issue 11: Pearson with leave-one-out retraining 0.54 at p̃ = 10 on an L2 softmax regression).
    Approximating H⁻¹ on the complement by 1/σ times the identity,

        H⁻¹ ≈ Gᵀ diag(1/λ) G + (I − GᵀG) / σ,

    - ``damping``: σ = l2 + distill.damping, the floor every eigenvalue of H + damping·I sits on
      (exact where the data term of the Hessian vanishes on the complement);
    - ``ritz``: σ = the harmonic mean of the positive Ritz values beyond the kept p̃ (the Krylov
      space's estimate of the rest of the spectrum, weighted the way 1/λ weights it), + damping;
    - ``none``: no tail (None).

    A σ that is not positive and finite is a ``ValueError`` naming the fix.
    """
    if tail == "none":
        return None
    if tail == "damping":
        sigma = l2 + damping
        if not sigma > 0:
            raise ValueError(
                f"distill.tail=damping needs l2 + distill.damping > 0 (it is {sigma}): set "
                "--config.distill.damping, or use distill.tail=ritz"
            )
        return float(sigma)
    if tail != "ritz":
        raise ValueError(f"distill.tail={tail!r} is not one of {TAILS}")
    values = np.asarray(ritz_values, np.float64)
    rest = values[np.argsort(-np.abs(values))[top_k:]]
    rest = rest[rest > 0]
    if rest.size == 0:
        raise ValueError(
            f"distill.tail=ritz needs positive Ritz values beyond the top {top_k}; there are none: "
            "raise arnoldi.num_iters above distill.top_k, or use distill.tail=damping"
        )
    return float(1.0 / np.mean(1.0 / rest) + damping)


def self_influence(
    g: jax.Array,
    eigvals: jax.Array,
    sqnorm: jax.Array | None = None,
    sigma: float | None = None,
) -> jax.Array:
    """Σ_i g_i² / λ_i per row (Alg. 1, line 24). High values flag mislabeled or atypical examples.

    With the tail (``sigma``, ``tail_sigma``) and ‖∇ℓ(x)‖² (``sqnorm``), adds the complement's
    share (‖∇ℓ(x)‖² − ‖g(x)‖²) / σ: G has orthonormal rows, so ‖g‖² is the part of ‖∇ℓ‖² inside
    span(G)."""
    plain = jnp.sum(jnp.square(g) / eigvals, axis=-1)
    if sigma is None:
        return plain
    return plain + (sqnorm - jnp.sum(jnp.square(g), axis=-1)) / sigma


def influence(
    g_train: jax.Array,
    g_test: jax.Array,
    eigvals: jax.Array,
    dots: jax.Array | None = None,
    sigma: float | None = None,
) -> jax.Array:
    """(num_train, num_test) matrix of ⟨g(x)/λ, g(z)⟩ (Alg. 1, line 26).

    Positive: up-weighting x lowers the loss on z (a proponent); negative: an opponent. With the
    tail (``sigma``) and the full gradients' inner products ``dots`` = ⟨∇ℓ(x), ∇ℓ(z)⟩
    (num_train, num_test), adds (⟨∇ℓ(x), ∇ℓ(z)⟩ − ⟨g(x), g(z)⟩) / σ (``tail_sigma``)."""
    plain = (g_train / eigvals) @ g_test.T
    if sigma is None:
        return plain
    return plain + (dots - g_train @ g_test.T) / sigma


def apply_inverse(
    eigvecs: Params, eigvals: jax.Array, vectors: Params, sigma: float | None = None
) -> Params:
    """P v = Gᵀ diag(1/λ) G v (+ (v − GᵀG v)/σ with the tail) for each row of the stacked
    ``vectors``: the approximation of H⁻¹ that ``self_influence`` and ``influence`` score with,
    applied in parameter space, so ⟨∇ℓ(x), P v⟩ = ⟨g(x)/λ, G v⟩ (+ the tail): the influence of
    x on a vector v such as the mean validation gradient (``score.validation``)."""
    leaves_g, leaves_v = jax.tree.leaves(eigvecs), jax.tree.leaves(vectors)
    flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
    coords = sum(
        jnp.tensordot(flat(v), flat(g), axes=(1, 1), preferred_element_type=jnp.float32)
        for g, v in zip(leaves_g, leaves_v, strict=True)
    )

    def leaf(g: jax.Array, v: jax.Array) -> jax.Array:
        inside = jnp.tensordot(coords, g, axes=(1, 0))
        out = jnp.tensordot(coords / eigvals, g, axes=(1, 0))
        if sigma is not None:
            out = out + (v - inside) / sigma
        return out.astype(v.dtype)

    return jax.tree.map(leaf, eigvecs, vectors)


def top_influential(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """For each test column of ``scores`` (num_train, num_test), the k strongest proponents.

    Returns (indices, values), each (num_test, k), by decreasing influence; pass ``-scores`` for
    opponents.
    """
    values, indices = jax.lax.top_k(scores.T, k)
    return indices, values
