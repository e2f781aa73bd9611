"""Distillation of the Arnoldi output into p̃ eigenpairs: Algorithm 1, lines 11–18.

The eigenvalues of the square Hessenberg block approximate the extreme eigenvalues of H (Ritz values);
mapping the small eigenvectors U through the Krylov basis, G = Uᵀ Q, gives approximate eigenvectors
in parameter space (line 17). G is computed once and cached by the pipeline; scoring only needs G
and λ.
"""

from typing import NamedTuple

import jax
import numpy as np

from influence import pytree
from influence.types import Params


class Eigenpairs(NamedTuple):
    eigvals: np.ndarray  # (p̃,) float64, ordered by the selection rule
    eigvecs: Params  # stacked pytree, leaves (p̃, *leaf.shape), orthonormal rows
    ritz_residuals: np.ndarray  # (p̃,) estimate of ‖H v − λ v‖ for each kept pair


class RitzPairs(NamedTuple):
    eigvals: np.ndarray  # (p̃,)
    coords: np.ndarray  # (p̃, m): eigenvectors in Krylov coordinates
    ritz_residuals: np.ndarray  # (p̃,)


def ritz_pairs(
    hessenberg: np.ndarray,
    num_completed: int,
    top_k: int,
    positive_only: bool = False,
    symmetric: bool = True,
) -> RitzPairs:
    """Eigenpairs of the m × m Hessenberg block, m = num_completed, selected per lines 12–16.

    Args:
      hessenberg: the (n + 1, n) matrix from Arnoldi.
      num_completed: m, the number of filled columns (n, or fewer after a breakdown).
      top_k: p̃, how many pairs to keep.
      positive_only: keep the p̃ largest positive eigenvalues instead of the p̃ largest |λ|.
      symmetric: symmetrise the block, (H̃ + H̃ᵀ)/2, before ``eigh``. The true Hessian is symmetric,
        so the asymmetry is sampling noise (a fresh batch per iteration) and round-off; ``False``
        uses the general ``eig`` and keeps real parts.

    The Ritz residual of pair i is |h_{m+1,m}| · |u_i[m]| (Saad, Numerical Methods for Large
    Eigenvalue Problems, Prop. 6.8); it is small once the pair has converged, so users can see
    whether n was large enough.
    """
    h = np.asarray(hessenberg, np.float64)
    m = int(num_completed)
    if not 0 < top_k <= m:
        raise ValueError(
            f"top_k={top_k} must be in [1, {m}] (the number of Arnoldi iterations done)"
        )
    block = h[:m, :m]
    if symmetric:
        eigvals, eigvecs = np.linalg.eigh(0.5 * (block + block.T))
    else:
        eigvals, eigvecs = np.linalg.eig(block)
        eigvals, eigvecs = eigvals.real, eigvecs.real
        eigvecs = eigvecs / np.linalg.norm(eigvecs, axis=0, keepdims=True)
    if positive_only:
        order = [i for i in np.argsort(-eigvals) if eigvals[i] > 0]
        if len(order) < top_k:
            raise ValueError(
                f"positive_only: only {len(order)} positive Ritz values, fewer than top_k={top_k}; "
                "lower top_k or raise num_iters"
            )
    else:
        order = list(np.argsort(-np.abs(eigvals)))
    order = np.asarray(order[:top_k])
    beta = abs(h[m, m - 1]) if m < h.shape[0] else 0.0
    residuals = beta * np.abs(eigvecs[m - 1, order])
    return RitzPairs(eigvals[order], eigvecs[:, order].T, residuals)


def to_parameter_space(coords: jax.Array, krylov_basis: Params) -> Params:
    """G = Uᵀ Q (Alg. 1, line 17): (p̃, m) Krylov coordinates → stacked (p̃, …) pytree.

    Only the first m = coords.shape[1] basis vectors are used; jit it with the basis' sharding to
    keep G sharded like the parameters.
    """
    m = coords.shape[1]
    head = jax.tree.map(lambda s: s[:m], krylov_basis)
    return pytree.stacked_combine(coords, head)


def distill(
    hessenberg: np.ndarray,
    krylov_basis: Params,
    num_completed: int,
    top_k: int,
    positive_only: bool = False,
    symmetric: bool = True,
) -> Eigenpairs:
    """Lines 11–18 end to end on unsharded inputs (the pipeline jits ``to_parameter_space``)."""
    pairs = ritz_pairs(hessenberg, num_completed, top_k, positive_only, symmetric)
    eigvecs = to_parameter_space(np.asarray(pairs.coords, np.float32), krylov_basis)
    return Eigenpairs(pairs.eigvals, eigvecs, pairs.ritz_residuals)
