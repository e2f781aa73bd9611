"""Gradient dot products (H = I): self-influence ‖∇ℓ(x)‖², train → test ⟨∇ℓ(x), ∇ℓ(z)⟩ on the
final checkpoint (TracIn with one checkpoint and unit learning rate; Pruthi et al. 2020).

Nothing to fit: no eigenpairs and σ = 1 in H⁻¹ ≈ Gᵀ diag(1/λ) G + (I − GᵀG)/σ, so the score job
computes ‖∇ℓ(x)‖² (one reverse pass per example) and the products with the query gradients (extra
GEMM columns), as it does for the tail term."""

from methods import checks
from methods.base import Kind, Method

GRADDOT = Method(
    name="graddot",
    kind=Kind.GRADIENT,
    equation="H⁻¹ ≈ I: I(x, z) = ⟨∇ℓ(x), ∇ℓ(z)⟩",
    check=checks.full_products,
    sigma=1.0,
)
