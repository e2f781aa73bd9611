"""Arnoldi (Schioppa et al. 2022, Algorithm 1): the top-p̃ eigenpairs of H from n Krylov
iterations over HVPs, H⁻¹ ≈ Gᵀ diag(1/λ) G. Fitted by its own stage, ``stages/arnoldi.py``,
which checkpoints the Krylov state so a preempted run resumes."""

import ml_collections
from jax.sharding import Mesh

from influence import krylov as krylov
from methods import checks
from methods.base import Method
from runtime.errors import InputError


def check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    a, d = config.arnoldi, config.distill
    if a.num_iters < 1:
        raise InputError(f"arnoldi.num_iters={a.num_iters} must be at least 1")
    if not 1 <= d.top_k <= a.num_iters:
        raise InputError(
            f"distill.top_k={d.top_k} must be between 1 and arnoldi.num_iters={a.num_iters} "
            "(p̃ ≤ n: Arnoldi yields at most n eigenpairs); lower top_k or raise num_iters"
        )
    checks.hvp_batch(config, mesh)
    if a.orthogonalization not in krylov.ORTHOGONALIZATION:
        raise InputError(
            f"arnoldi.orthogonalization={a.orthogonalization!r}; choose one of "
            f"{sorted(krylov.ORTHOGONALIZATION)}"
        )
    if a.checkpoint_every < 1:
        raise InputError(f"arnoldi.checkpoint_every={a.checkpoint_every} must be at least 1")


ARNOLDI = Method(
    name="arnoldi",
    equation="H⁻¹ ≈ Gᵀ diag(1/λ) G, (λ, G) the top-p̃ Ritz pairs of n Arnoldi iterations",
    num_vectors=lambda config, num_params: config.distill.top_k,
    # its fingerprint: pipeline/workdir.eigenpairs_fingerprint, as before methods
    check=check,
    stage="stages.arnoldi",
)
