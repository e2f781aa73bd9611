"""TracIn (Pruthi et al. 2020, TracInCP): Σ_c η_c ⟨∇ℓ_c(x), ∇ℓ_c(z)⟩ over the C checkpoints the
train job kept (``train.keep_epochs``), η_c the learning rate each was trained at; self-influence
Σ_c η_c ‖∇ℓ_c(x)‖².

Nothing to fit: graddot at each kept checkpoint (k = 0 eigenpairs, σ = 1), summed by the score
job with the weights η_c; it costs C reverse passes per example. Run the train job with
``train.keep_epochs`` set; params trained without them are a one-line error before scoring.
"""

import ml_collections
from jax.sharding import Mesh

from methods import checks
from methods.base import Kind, Method
from runtime.errors import InputError


def _check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    if not config.train.keep_epochs:
        raise InputError(
            "method.name=tracin needs the checkpoints it sums over: set train.keep_epochs to the "
            f'epochs to keep (e.g. --config.train.keep_epochs="({config.train.num_epochs},)") '
            "and train in a new --workdir"
        )
    late = [e for e in config.train.keep_epochs if e > config.train.num_epochs]
    if late:
        raise InputError(
            f"method.name=tracin: train.keep_epochs={tuple(config.train.keep_epochs)} names epochs "
            f"{late} past train.num_epochs={config.train.num_epochs}, which training never "
            "reaches; keep epochs up to train.num_epochs"
        )
    checks.full_products(config, mesh)


TRACIN = Method(
    name="tracin",
    equation="I(x, z) = Σ_c η_c ⟨∇ℓ_c(x), ∇ℓ_c(z)⟩ over the kept checkpoints",
    kind=Kind.GRADIENT,
    fingerprint=("train.keep_epochs",),
    check=_check,
    sigma=1.0,
    checkpoints=True,
)
