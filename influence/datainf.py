"""DataInf's closed-form inverse (Kwon, Wu, Wu & Zou 2023, "DataInf", eq. 5).

For one layer with flattened per-example gradients g_j ∈ R^p and the damped Fisher matrix
A + λI = (1/n) Σ_j g_j g_jᵀ + λI, DataInf swaps the inverse and the average,

    ((1/n) Σ_j g_j g_jᵀ + λI)⁻¹  ≈  (1/n) Σ_j (g_j g_jᵀ + λI)⁻¹,

exact only for n = 1; its error grows with the layer's size p (DataInf bounds it by O(p²)) and
with ‖g_j‖²/λ, and does not shrink with more data (benchmarks/convergence.py measures it). Each term
is inverted by Sherman–Morrison, (λI + g gᵀ)⁻¹ v = (v − g ⟨g, v⟩ / (λ + ‖g‖²)) / λ, so

    (A + λI)⁻¹ v  ≈  (1/λ) (v − (1/n) Σ_j ⟨g_j, v⟩ / (λ + ‖g_j‖²) g_j)  =  (I − C) v / λ,
    C = (1/n) Σ_j g_j g_jᵀ / (λ + ‖g_j‖²),

with no iteration and no p × p matrix: O(n·p) per vector. Its damping λ_l = 0.1 · mean_j mean(g_j²)
is the reference code's. All functions act on one layer; apply them layer by layer.
"""

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def datainf_damping(train_grads: jax.Array, ratio: float = 0.1) -> jax.Array:
    """λ = ratio · mean_j mean(g_j²) of the (n, p) per-example gradients (the reference code's
    ``mean(grad²) / 10``): damping on the scale of the gradients' entries."""
    return ratio * jnp.mean(jnp.square(train_grads.astype(jnp.float32)))


def datainf_apply(
    train_grads: jax.Array, v: jax.Array, damping: float | jax.Array, *, chunk_size: int = 1024
) -> jax.Array:
    """(1/λ)(v − (1/n) Σ_j ⟨g_j, v⟩ / (λ + ‖g_j‖²) g_j) for each row of v (k, p) (or one (p,)).

    The n gradients go through ``lax.scan`` in chunks of ``chunk_size`` rows, so the largest
    intermediate is k × chunk_size: never n × n, never p × p. Rows added to pad n to a multiple of
    the chunk are zero and contribute nothing (⟨0, v⟩ = 0).
    """
    grads = jnp.asarray(train_grads, jnp.float32)
    vs = jnp.asarray(v, jnp.float32)
    single = vs.ndim == 1
    vs = vs[None] if single else vs
    n, p = grads.shape
    chunk = min(chunk_size, n)
    pad = -n % chunk
    chunks = jnp.pad(grads, ((0, pad), (0, 0))).reshape(-1, chunk, p)
    lam = jnp.asarray(damping, jnp.float32)

    def body(acc: jax.Array, g: jax.Array) -> tuple[jax.Array, None]:
        dots = jnp.matmul(vs, g.T, precision=HIGHEST)  # (k, chunk): ⟨g_j, v⟩
        coeffs = dots / (lam + jnp.sum(jnp.square(g), axis=1))
        return acc + jnp.matmul(coeffs, g, precision=HIGHEST), None

    acc, _ = jax.lax.scan(body, jnp.zeros_like(vs), chunks)
    out = (vs - acc / n) / lam
    return out[0] if single else out


def datainf_matrix(train_grads: jax.Array, damping: float | jax.Array) -> jax.Array:
    """C = (1/n) Σ_j g_j g_jᵀ / (λ + ‖g_j‖²), (p, p), with (A + λI)⁻¹ ≈ (I − C) / λ: the explicit
    form of ``datainf_apply``, for small p (tests, and applying to many vectors at once)."""
    grads = jnp.asarray(train_grads, jnp.float32)
    lam = jnp.asarray(damping, jnp.float32)
    weighted = grads / (lam + jnp.sum(jnp.square(grads), axis=1, keepdims=True))
    return jnp.matmul(weighted.T, grads, precision=HIGHEST) / grads.shape[0]
