"""Gradient dot products (H = I): self-influence ‖∇ℓ(x)‖², train → test ⟨∇ℓ(x), ∇ℓ(z)⟩ on the
final checkpoint (TracIn with one checkpoint and unit learning rate; Pruthi et al. 2020).

Nothing to fit: no eigenpairs and σ = 1 in H⁻¹ ≈ Gᵀ diag(1/λ) G + (I − GᵀG)/σ, so the score job
computes ‖∇ℓ(x)‖² (one reverse pass per example) and the products with the query gradients (extra
GEMM columns), as it does for the tail term."""

import ml_collections
from jax.sharding import Mesh

from methods.base import Method
from pipeline.errors import InputError
from pipeline.validate import MAX_TAIL_QUERIES


def check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Input checks of every method scored by full-gradient products instead of eigenpairs
    (graddot, tracin and the ``Operator`` methods): no tail, few enough queries."""
    del mesh
    name = config.method.name
    if config.distill.tail != "none":
        raise InputError(
            f"method.name={name} with distill.tail={config.distill.tail}: it has no subspace to "
            "add a tail to (its approximation of H⁻¹ covers every direction); set "
            "distill.tail=none"
        )
    if config.score.num_queries > MAX_TAIL_QUERIES:
        raise InputError(
            f"method.name={name} with score.num_queries={config.score.num_queries}: its train → "
            "test stores one product per query beside each training example (each query is a "
            f"tangent of its own), so it takes at most {MAX_TAIL_QUERIES} queries; lower "
            "score.num_queries"
        )


GRADDOT = Method(
    name="graddot",
    equation="H⁻¹ ≈ I: I(x, z) = ⟨∇ℓ(x), ∇ℓ(z)⟩",
    num_vectors=lambda config, num_params: 0,
    fingerprint=lambda config: {},
    check=check,
    sigma=1.0,
)
