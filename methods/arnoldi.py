"""Arnoldi (Schioppa et al. 2022, Algorithm 1): the top-p̃ eigenpairs of H from n Krylov
iterations over HVPs, H⁻¹ ≈ Gᵀ diag(1/λ) G. Fitted by its own stage, ``pipeline/arnoldi.py``,
which checkpoints the Krylov state so a preempted run resumes."""

from methods.base import Method
from pipeline import validate

ARNOLDI = Method(
    name="arnoldi",
    equation="H⁻¹ ≈ Gᵀ diag(1/λ) G, (λ, G) the top-p̃ Ritz pairs of n Arnoldi iterations",
    num_vectors=lambda config, num_params: config.distill.top_k,
    # its fingerprint: pipeline/workdir.eigenpairs_fingerprint, as before methods
    check=validate.check_arnoldi,
    stage="pipeline.arnoldi",
)
