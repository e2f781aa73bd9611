"""The generalized Fisher information matrix (GFIM) of a LoRA-adapted matrix: HyperINF's curvature.

HyperINF (Zhou, Fan & Jaggi 2024, arXiv:2410.05090) treats the gradient of a LoRA factor as a
matrix G ∈ R^{r × d} with r ≪ d (LoRA A's gradient, r × d_in, as is; B's, d_out × r, transposed)
and assumes its r rows independent with a shared second moment. The r·d × r·d Fisher matrix
E[vec(G) vec(G)ᵀ] (rows stacked) then becomes block diagonal, I_r ⊗ A, with the d × d GFIM

    A = (1/n) Σ_i G_iᵀ G_i

(r times the rows' estimated second moment), whose inverse applies to a gradient row by row,
(I_r ⊗ A)⁻¹ vec(G) = vec(G A⁻¹): one d × d inverse per adapted matrix whatever r, computed with
Schulz's iteration (``influence/schulz.py``) after damping A + λI, λ = ratio · mean(G²) +
constant (the public code's ratio is 0.1).

The influence of training point i on the mean validation loss is then −Σ_l ⟨v̄_l (A_l + λ_l I)⁻¹,
G_{i,l}⟩ with v̄_l the validation gradient of matrix l averaged over the validation set (Koh &
Liang's influence function with A + λI for the Hessian).
"""

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def as_rows(grad: jax.Array) -> jax.Array:
    """One gradient leaf as an r × d matrix with d ≥ r: a 2-D leaf as is when it is wide (or
    square), transposed when tall; a 1-D leaf (a bias) as 1 × n.

    Orientation by shape, not by name, so a Flax LoRA kernel stored (d_in, r) and a PyTorch-style
    A stored (r, d_in) both give rows of length d_in. A square leaf (r = d, which LoRA never makes)
    keeps its rows: its GFIM is then d × d over the second axis, the same size either way.
    """
    if grad.ndim == 1:
        return grad[None, :]
    if grad.ndim != 2:
        raise ValueError(f"as_rows takes a 1-D or 2-D leaf, not shape {grad.shape}")
    return grad if grad.shape[1] >= grad.shape[0] else grad.T


def from_rows(rows: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of ``as_rows`` for a leaf of ``shape``."""
    if len(shape) == 1:
        return rows.reshape(shape)
    return rows if rows.shape == tuple(shape) else rows.T


def stacked_rows(grads: jax.Array) -> jax.Array:
    """Per-example gradients of one leaf, (n, *leaf.shape), as (n, r, d) rows."""
    return jax.vmap(as_rows)(grads)


def gfim(rows: jax.Array) -> jax.Array:
    """A = (1/n) Σ_i G_iᵀ G_i from stacked rows (n, r, d): a (d, d) float32 matrix.

    All n·r rows form one (n·r, d) matrix M and A = MᵀM / n: one GEMM, never an (r·d)² matrix.
    """
    n, r, d = rows.shape
    m = rows.reshape(n * r, d).astype(jnp.float32)
    return jnp.matmul(m.T, m, precision=HIGHEST) / n


def damping(rows: jax.Array, ratio: float = 0.1, constant: float = 1e-8) -> jax.Array:
    """λ = ratio · mean(G²) + constant over all entries of the stacked rows (n, r, d).

    mean(G²) = tr(A) / (r·d), so ratio · mean(G²) is ratio/r times A's mean eigenvalue: the
    damping follows the gradients' scale. ``constant`` keeps A + λI positive definite when every
    gradient of a matrix is zero (LoRA's A at initialisation, where B = 0).
    """
    return ratio * jnp.mean(jnp.square(rows.astype(jnp.float32))) + constant


def damped_gfim(rows: jax.Array, ratio: float = 0.1, constant: float = 1e-8) -> jax.Array:
    """A + λI, the matrix HyperINF inverts."""
    a = gfim(rows)
    return a + damping(rows, ratio, constant) * jnp.eye(a.shape[0], dtype=a.dtype)


def apply_inverse(grad: jax.Array, inverse: jax.Array) -> jax.Array:
    """G (A + λI)⁻¹ for one gradient leaf: its rows times the (d, d) ``inverse``, in the leaf's
    shape. ``vmap`` it over a stack of gradients (validation examples, say)."""
    rows = as_rows(grad)
    return from_rows(jnp.matmul(rows, inverse.astype(rows.dtype), precision=HIGHEST), grad.shape)
