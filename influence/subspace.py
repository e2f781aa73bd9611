"""Influence restricted to a given subspace, and the explicit Hessian: the paper's baselines.

Schioppa et al. (2022, §5) compare Arnoldi's Krylov subspace against subspaces that ignore the
Hessian when they are chosen:

- **RandProj** (influence sketching, Wojnowicz et al. 2016): a Gaussian G with p̃ rows and
  E[GᵀG] = I (entries N(0, 1/p̃));
- **RandSelect**: p̃ parameters chosen at random (G's rows are coordinate vectors);

and in both influence is ⟨G∇ℓ(z), (G H Gᵀ)⁻¹ G∇ℓ(x)⟩. That expression does not change when the
rows of G are replaced by any basis of their span, so this module orthonormalises them
(Q = R⁻ᵀ G, ``orthonormal_rows``), forms the p̃ × p̃ restriction M = Q H Qᵀ from p̃ HVPs and
diagonalises it, M = V Λ Vᵀ (Rayleigh–Ritz, ``subspace_pairs``): the rows of Vᵀ Q and Λ are
eigenpairs of exactly the format Arnoldi distils (orthonormal rows, eigenvalues), so scoring,
the tail term and every output are shared. Λ are the Ritz values of H on span(G), the estimates
of H's eigenvalues that the paper's Figure 1 holds against the exact spectrum.

- **Exact**: H itself, column by column from HVPs along the coordinate vectors
  (``coordinate_rows``), for models small enough that the p × p matrix fits (eigh on the host).
"""

import jax
import jax.numpy as jnp
import numpy as np

from influence import pytree
from influence.types import Params


def gaussian_rows(key: jax.Array, like: Params, num: int) -> Params:
    """``num`` Gaussian vectors shaped like ``like`` (a pytree of arrays or ShapeDtypeStructs),
    stacked, with entries N(0, 1/num): Σᵢ gᵢgᵢᵀ has expectation I (E[GᵀG] = I)."""
    leaves, treedef = jax.tree.flatten(like)
    keys = jax.random.split(key, len(leaves))
    rows = [
        jax.random.normal(k, (num, *x.shape), jnp.float32).astype(x.dtype) / np.sqrt(num)
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, rows)


def coordinate_rows(indices: jax.Array, like: Params) -> Params:
    """The coordinate vectors e_i, i in ``indices`` (flat positions over the leaves of ``like``
    in flattening order), stacked: row r is 1 at position indices[r] and 0 elsewhere."""
    leaves, treedef = jax.tree.flatten(like)
    rows, offset = [], 0
    for x in leaves:
        local = indices - offset
        size = int(np.prod(x.shape))
        hit = (local >= 0) & (local < size)
        cols = jnp.arange(size)
        one_hot = (cols[None, :] == jnp.where(hit, local, -1)[:, None]).astype(x.dtype)
        rows.append(one_hot.reshape(indices.shape[0], *x.shape))
        offset += size
    return jax.tree.unflatten(treedef, rows)


def gram(stacked: Params, other: Params | None = None) -> jax.Array:
    """(k, m) matrix of inner products ⟨stacked[i], other[j]⟩ summed over leaves (float32);
    ``other`` defaults to ``stacked``."""
    other = stacked if other is None else other

    def leaf(a: jax.Array, b: jax.Array) -> jax.Array:
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        return jnp.matmul(a, b.T, preferred_element_type=jnp.float32)

    return sum(jax.tree.leaves(jax.tree.map(leaf, stacked, other)))


def orthonormal_rows(stacked: Params) -> Params:
    """Rows spanning the same space as ``stacked``'s, orthonormal: Cholesky QR twice (CholQR2:
    C = SSᵀ = LLᵀ, S ← L⁻¹S, repeated once, which brings ‖QQᵀ − I‖ to round-off for any
    condition number below ~1/√ε; a Gaussian or coordinate G is far better conditioned)."""
    for _ in range(2):
        chol = jnp.linalg.cholesky(gram(stacked).astype(jnp.float32))
        inverse = jax.scipy.linalg.solve_triangular(
            chol, jnp.eye(chol.shape[0], dtype=chol.dtype), lower=True
        )
        stacked = pytree.stacked_combine(inverse, stacked)
    return stacked


def subspace_pairs(restricted: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(λ, Vᵀ): the eigenpairs of the symmetrised p̃ × p̃ restriction M = Q H Qᵀ, ordered by
    decreasing |λ| (the order Arnoldi's distillation keeps), the first ``top_k`` of them.
    M is symmetrised because its columns may come from HVPs on different batches."""
    m = np.asarray(restricted, np.float64)
    eigvals, eigvecs = np.linalg.eigh(0.5 * (m + m.T))
    order = np.argsort(-np.abs(eigvals), kind="stable")[:top_k]
    return eigvals[order], eigvecs[:, order].T


def residual_norms(eigvals: jax.Array, vectors: Params, hvps: Params) -> jax.Array:
    """‖H vᵢ − λᵢ vᵢ‖ per row, from the rows vᵢ and their products H vᵢ (stacked alike)."""
    diff = jax.tree.map(
        lambda hv, v: hv - eigvals.reshape(-1, *([1] * (v.ndim - 1))).astype(v.dtype) * v,
        hvps,
        vectors,
    )
    return jnp.sqrt(jnp.diag(gram(diff)))


def flatten_rows(stacked: Params) -> jax.Array:
    """(k, p) matrix of a stacked pytree's rows, leaves concatenated in flattening order."""
    return jnp.concatenate([x.reshape(x.shape[0], -1) for x in jax.tree.leaves(stacked)], axis=1)


def unflatten_rows(matrix: jax.Array, like: Params) -> Params:
    """The inverse of ``flatten_rows``: a (k, p) matrix as k stacked vectors shaped like ``like``."""
    leaves, treedef = jax.tree.flatten(like)
    rows, offset = [], 0
    for x in leaves:
        size = int(np.prod(x.shape))
        rows.append(matrix[:, offset : offset + size].reshape(-1, *x.shape).astype(x.dtype))
        offset += size
    return jax.tree.unflatten(treedef, rows)
