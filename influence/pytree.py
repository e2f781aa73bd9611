"""Linear algebra on pytrees and on *stacked* pytrees.

A stacked pytree has the same structure as the params, every leaf carrying an extra leading axis:
the Krylov basis is one such tree with leaves of shape ``(n + 1, *leaf.shape)`` and the distilled
eigenvectors one with leaves ``(p̃, *leaf.shape)``. Keeping one array per leaf (instead of a Python
list of pytrees) lets a leaf of the basis be sharded exactly like the parameter it spans, so the
inner products below become global reductions over the mesh without any gather.
"""

import jax
import jax.numpy as jnp

from influence.types import Params


def vdot(a: Params, b: Params) -> jax.Array:
    """⟨a, b⟩ summed over all leaves, accumulated in float32."""
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.sum(x * y, dtype=jnp.float32), a, b))
    return sum(leaves, jnp.zeros((), jnp.float32))


def norm(a: Params) -> jax.Array:
    return jnp.sqrt(vdot(a, a))


def axpy(alpha: jax.Array, x: Params, y: Params) -> Params:
    """alpha * x + y, leaf by leaf."""
    return jax.tree.map(lambda xi, yi: (alpha * xi + yi).astype(yi.dtype), x, y)


def scale(alpha: jax.Array, x: Params) -> Params:
    return jax.tree.map(lambda xi: (alpha * xi).astype(xi.dtype), x)


def num_params(tree: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def stacked_zeros(tree: Params, num: int) -> Params:
    """Zeros with leaves of shape (num, *leaf.shape): storage for ``num`` vectors like ``tree``."""
    return jax.tree.map(lambda x: jnp.zeros((num, *x.shape), x.dtype), tree)


def stacked_get(stacked: Params, index: jax.Array | int) -> Params:
    """The vector at position ``index`` (may be traced) of a stacked pytree."""
    return jax.tree.map(lambda s: jax.lax.dynamic_index_in_dim(s, index, keepdims=False), stacked)


def stacked_set(stacked: Params, index: jax.Array | int, vector: Params) -> Params:
    """Return ``stacked`` with position ``index`` replaced by ``vector``."""
    return jax.tree.map(
        lambda s, v: jax.lax.dynamic_update_index_in_dim(s, v.astype(s.dtype), index, 0),
        stacked,
        vector,
    )


def stacked_combine(coeffs: jax.Array, stacked: Params) -> Params:
    """Σ_j coeffs[..., j] · stacked[j]: maps coordinates in a stacked basis back to parameter space.

    ``coeffs`` of shape (m,) gives one vector; of shape (k, m) gives a stacked tree of k vectors.
    """

    def leaf(s: jax.Array) -> jax.Array:
        dtype = jnp.promote_types(s.dtype, jnp.float32)  # a bfloat16 basis: float32 sums
        return jnp.tensordot(
            coeffs.astype(dtype), s, axes=([coeffs.ndim - 1], [0]), preferred_element_type=dtype
        )

    return jax.tree.map(leaf, stacked)


def stacked_vdot(stacked: Params, vector: Params) -> jax.Array:
    """(⟨stacked[j], vector⟩)_j as a float32 vector of shape (m,)."""

    def leaf(s: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.tensordot(
            s,
            v,
            axes=(list(range(1, s.ndim)), list(range(v.ndim))),
            preferred_element_type=jnp.float32,
        )

    return sum(jax.tree.leaves(jax.tree.map(leaf, stacked, vector)))
