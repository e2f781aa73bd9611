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
    del mesh
    if config.distill.tail != "none":
        raise InputError(
            f"method.name={config.method.name} with distill.tail={config.distill.tail}: it has "
            "no subspace to add a tail to (it is H = I everywhere); set distill.tail=none"
        )
    if config.score.num_queries > MAX_TAIL_QUERIES:
        raise InputError(
            f"method.name={config.method.name} with score.num_queries={config.score.num_queries}: "
            "its train → "
            "test stores ⟨∇ℓ(x), ∇ℓ(z)⟩ for every query beside each training example, so it "
            f"takes at most {MAX_TAIL_QUERIES} queries; lower score.num_queries"
        )


GRADDOT = Method(
    name="graddot",
    equation="H⁻¹ ≈ I: I(x, z) = ⟨∇ℓ(x), ∇ℓ(z)⟩",
    num_vectors=lambda config, num_params: 0,
    fingerprint=lambda config: {},
    check=check,
    sigma=1.0,
)
