"""RandProj and RandSelect (Schioppa et al. 2022, §5 baselines): influence restricted to a
subspace chosen without looking at H, H⁻¹ ≈ Gᵀ (G H Gᵀ)⁻¹ G.

- ``randproj``: G Gaussian, p̃ rows, E[GᵀG] = I (influence sketching, Wojnowicz et al. 2016);
- ``randselect``: p̃ coordinates of the selected params drawn at random (``method.seed``).

The fit (``influence/subspace.py``): orthonormalise the rows (same span, same influence), one HVP
per row on the batches Arnoldi would draw (``arnoldi.hvp_batch_size``, ``arnoldi.fixed_batch``,
``method.seed``), the p̃ × p̃ restriction M = Q H Qᵀ, M = V Λ Vᵀ, eigenpairs (Λ, Vᵀ Q): Ritz pairs
of H on span(G), scored exactly like Arnoldi's. Cost: p̃ HVPs and 3 × p̃ parameter-sized vectors.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from influence import pytree, subspace
from influence.hvp import make_hvp
from methods import checks
from methods.base import Context, Fitted, Kind, Method, fitted
from parallel import sharding
from runtime import finite
from runtime.config import Block
from runtime.errors import InputError

Rows = Callable[[ml_collections.ConfigDict, Any, int], Any]


def jit_hvp(ctx: Context) -> Callable[[Any, dict, Any], Any]:
    """(params, batch, v) → H v over the selected leaves (+ l2 v), laid out like the params."""
    return jax.jit(
        make_hvp(ctx.task.per_example_loss, ctx.config.l2, ctx.selection),
        in_shardings=(ctx.param_sh, sharding.batch_sharding(ctx.mesh), ctx.vector_sh),
        out_shardings=ctx.vector_sh,
    )


def _gaussian(config: ml_collections.ConfigDict, like: Any, num: int) -> Any:
    return subspace.gaussian_rows(jax.random.key(config.method.seed), like, num)


def _coordinates(config: ml_collections.ConfigDict, like: Any, num: int) -> Any:
    total = pytree.num_params(like)
    picked = np.random.default_rng(config.method.seed).choice(total, num, replace=False)
    return subspace.coordinate_rows(jnp.asarray(np.sort(picked), jnp.int32), like)


def fit_subspace(ctx: Context, params: Any, rows: Rows, name: str) -> Fitted:
    """Rayleigh–Ritz of H on the span of ``rows``' p̃ vectors (module docstring)."""
    config, k = ctx.config, ctx.config.distill.top_k
    stacked_sh = sharding.stacked_shardings(ctx.vector_sh)
    basis = jax.jit(
        lambda: subspace.orthonormal_rows(rows(config, ctx.vectors_like, k)),
        out_shardings=stacked_sh,
    )()
    row = jax.jit(pytree.stacked_get, out_shardings=ctx.vector_sh, static_argnums=1)
    put = jax.jit(pytree.stacked_set, out_shardings=stacked_sh, donate_argnums=0)
    hvp = jit_hvp(ctx)
    products = jax.jit(lambda b: jax.tree.map(jnp.zeros_like, b), out_shardings=stacked_sh)(basis)
    guard = finite.Guard(name, "an HVP", "check the trained params and the data")
    with ctx.progress(name, k) as progress:
        for i in range(k):
            hv = hvp(params, ctx.hvp_batch(config.method.seed, i), row(basis, i))
            guard.update(i + 1, pytree.norm(hv))
            products = put(products, i, hv)
            progress(i + 1)
    guard.check("nothing of this fit was saved")
    restricted = sharding.replicated_to_host(
        jax.jit(subspace.gram, out_shardings=sharding.replicated(ctx.mesh))(basis, products)
    )
    eigvals, coords = subspace.subspace_pairs(restricted, k)
    coords = jnp.asarray(coords, jnp.float32)
    combine = jax.jit(pytree.stacked_combine, out_shardings=stacked_sh)
    eigvecs, hvps = combine(coords, basis), combine(coords, products)
    residuals = sharding.replicated_to_host(
        jax.jit(subspace.residual_norms, out_shardings=sharding.replicated(ctx.mesh))(
            jnp.asarray(eigvals, jnp.float32), eigvecs, hvps
        )
    )
    logging.info("%s: %d Ritz values of H on a random subspace: %s", name, k, eigvals[:10])
    return fitted(eigvecs, eigvals, residuals, num_hvps=k)


def _check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    if config.distill.top_k < 1:
        raise InputError(f"distill.top_k={config.distill.top_k} must be at least 1")
    checks.hvp_batch(config, mesh)


def _check_size(config: ml_collections.ConfigDict, selected: Any) -> None:
    num_params = pytree.num_params(selected)
    if config.distill.top_k > num_params:
        raise InputError(
            f"distill.top_k={config.distill.top_k} exceeds the {num_params} selected params: "
            f"method.name={config.method.name} needs p̃ ≤ p; lower distill.top_k"
        )


CONFIG = (
    Block("method", {"seed": 0}),  # randproj's Gaussian G, randselect's coordinates, their HVPs
    Block("distill", {"top_k": 20}),
    Block("arnoldi", {"hvp_batch_size": 512, "fixed_batch": False}),  # their HVP batches
)


def _method(name: str, equation: str, rows: Rows) -> Method:
    return Method(
        name=name,
        kind=Kind.EIGENPAIR,
        equation=equation,
        config=CONFIG,
        fingerprint=(
            "method.seed",
            "distill.top_k",
            "arnoldi.hvp_batch_size",
            "arnoldi.fixed_batch",
        ),
        keeps_top_k=True,
        fit=lambda ctx, params: fit_subspace(ctx, params, rows, name),
        check=_check,
        check_size=_check_size,
    )


RANDPROJ = _method(
    "randproj", "H⁻¹ ≈ Gᵀ (G H Gᵀ)⁻¹ G, G Gaussian with p̃ rows, E[GᵀG] = I", _gaussian
)
RANDSELECT = _method(
    "randselect", "H⁻¹ ≈ Gᵀ (G H Gᵀ)⁻¹ G, G's rows p̃ random coordinate vectors", _coordinates
)
