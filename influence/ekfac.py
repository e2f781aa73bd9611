"""EK-FAC: K-FAC's Kronecker eigenbasis with eigenvalues refitted to the per-example gradients
(George et al. 2018, "Fast Approximate Natural Gradient Descent in a Kronecker-factored
Eigenbasis"; as the influence preconditioner of Grosse et al. 2023, "Studying Large Language
Model Generalization with Influence Functions", and of the PyTorch library kronfluence).

For a dense layer y = a W (+ b) with kernel W (in × out), applied at T positions of an example
with inputs a_t and output gradients δ_t = ∂ℓ/∂y_t, the per-example gradient is
G = Σ_t a_t δ_tᵀ (in × out; with the bias, a_t gets a trailing 1 and G a last row Σ_t δ_tᵀ).
K-FAC approximates the layer's block of the Fisher E[vec(G) vec(G)ᵀ] by S ⊗ A (Martens & Grosse
2015), with

    A = E[a aᵀ]   (in × in),   S = E[δ δᵀ]   (out × out),

whose eigenbases A = Q_A diag(λ_A) Q_Aᵀ, S = Q_S diag(λ_S) Q_Sᵀ give the eigenbasis Q_A ⊗ Q_S of
S ⊗ A. K-FAC's eigenvalues in that basis are λ_A ⊗ λ_S; EK-FAC keeps the basis and replaces them
with the second moments of the gradients' coordinates in it (George et al.'s eigenvalue correction):

    Λ[i, j] = E[(Q_Aᵀ G Q_S)[i, j]²],

the diagonal (in that basis) that best fits the Fisher in Frobenius norm. The damped inverse
applied to a gradient G of the layer (kronfluence's ``Ekfac.precondition_gradient``, in our
in × out orientation: its Q_Sᵀ G Q_A with G out × in is our (Q_Aᵀ G Q_S)ᵀ) is

    P G = Q_A ((Q_Aᵀ G Q_S) / (Λ + λ)) Q_Sᵀ,

elementwise division. Pure functions of arrays: the passes that estimate A, S and Λ over the data
are ``methods/ekfac.py``'s.
"""

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def with_ones(inputs: jax.Array) -> jax.Array:
    """Inputs (…, in) with a trailing 1 appended: the bias as one more input column, so that a
    layer's kernel and bias form one (in + 1) × out gradient (kronfluence's choice)."""
    return jnp.concatenate([inputs, jnp.ones((*inputs.shape[:-1], 1), inputs.dtype)], axis=-1)


def factor_sums(
    inputs: jax.Array, deltas: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(Σ_b Σ_t w a aᵀ, Σ_b Σ_t w δ δᵀ, Σ w) of a batch: inputs (B, T, in), output gradients
    (B, T, out), 0/1 rows ``mask`` (B,); float32.

    w_bt = m_b where the position's output gradient is not all zero, else 0: a position the loss
    cannot reach (padding after a sequence's end: with the loss masked there and padded keys
    masked in attention, its δ is exactly 0 in every layer) stays out of A, as kronfluence keeps
    out the positions its attention mask marks, without the task having to name its padding.
    S is unchanged by it (a zero δ adds nothing)."""
    x, d = inputs.astype(jnp.float32), deltas.astype(jnp.float32)
    live = mask[:, None] * jnp.any(d != 0, axis=-1)
    a = jnp.einsum("bt,bti,btj->ij", live, x, x, precision=HIGHEST)
    s = jnp.einsum("bt,bti,btj->ij", live, d, d, precision=HIGHEST)
    return a, s, jnp.sum(live)


def eigenbasis(covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues ascending, orthonormal eigenvectors as columns) of a symmetric factor, by
    float64 ``eigh`` on the host (kronfluence's ``eigendecomposition_dtype``): the factors are at
    most a few thousand wide, and float32 ``eigh`` loses the small eigenvalues' vectors."""
    c = np.asarray(covariance, np.float64)
    return np.linalg.eigh((c + c.T) / 2)


def rotate(grads: jax.Array, q_in: jax.Array, q_out: jax.Array) -> jax.Array:
    """Q_Aᵀ G Q_S for gradients (…, in, out): their coordinates in the Kronecker eigenbasis."""
    return jnp.einsum("ia,...io,ob->...ab", q_in, grads, q_out, precision=HIGHEST)


def unrotate(coords: jax.Array, q_in: jax.Array, q_out: jax.Array) -> jax.Array:
    """Q_A C Q_Sᵀ: coordinates (…, in, out) back to gradients (``rotate``'s inverse)."""
    return jnp.einsum("ia,...ab,ob->...io", q_in, coords, q_out, precision=HIGHEST)


def eigenvalue_sums(
    grads: jax.Array, mask: jax.Array, q_in: jax.Array, q_out: jax.Array
) -> jax.Array:
    """Σ_n m_n (Q_Aᵀ G_n Q_S)², (in, out), of per-example gradients (n, in, out): the numerator of
    the corrected eigenvalues Λ (George et al.'s correction)."""
    coords = rotate(grads.astype(jnp.float32), q_in, q_out)
    return jnp.einsum("n,nab->ab", mask, jnp.square(coords), precision=HIGHEST)


def damping(eigenvalues: np.ndarray, ratio: float, l2: float) -> float:
    """λ = ratio · mean(Λ) + l2: kronfluence's heuristic (its ``damping_factor=None``: 0.1 times
    the mean corrected eigenvalue), plus the run's L2 term, which adds l2·I to the Hessian and so
    l2 to every eigenvalue in any orthonormal basis."""
    return float(ratio * np.mean(np.asarray(eigenvalues, np.float64)) + l2)


def precondition(
    grads: jax.Array, q_in: jax.Array, q_out: jax.Array, scale: jax.Array
) -> jax.Array:
    """P G = Q_A ((Q_Aᵀ G Q_S) / scale) Q_Sᵀ for gradients (…, in, out), scale = Λ + λ."""
    return unrotate(rotate(grads, q_in, q_out) / scale, q_in, q_out)
