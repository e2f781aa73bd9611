"""The exact Hessian (Schioppa et al. 2022, Table 1's reference; Koh & Liang 2017): H of the
mean training loss over the whole training split (+ l2 I), built column by column from HVPs
along coordinate vectors, then every eigenpair (``eigh`` in float64): H⁻¹ = V diag(1/λ) Vᵀ in
full, (H + damping I)⁻¹ with ``distill.damping``, scored by the shared scorer with k = p.

Only for models whose p × p matrix fits: more than ``method.max_params`` selected params is a
one-line error before any work. Cost: p / ``method.chunk`` × (N / b) vmapped HVP calls.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from influence import pytree, subspace
from influence.hvp import make_hvp
from methods import checks, passes
from methods.base import Context, Fitted, Kind, Method, fitted
from parallel import sharding
from parallel.mesh import DATA_AXIS
from runtime import finite
from runtime.config import Block
from runtime.errors import InputError


def hessian(ctx: Context, params: Any) -> np.ndarray:
    """The p × p Hessian of the mean training loss over the selected params (+ l2 I), float64
    on the host; columns ``method.chunk`` at a time (a vmap of HVPs along coordinate vectors)."""
    config = ctx.config
    like = ctx.vectors_like
    p = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(like))
    hvp = make_hvp(ctx.task.per_example_loss, config.l2, ctx.selection)
    repl = sharding.replicated(ctx.mesh)

    def columns(params: Any, batch: dict, indices: jax.Array) -> jax.Array:
        basis = subspace.coordinate_rows(indices, like)
        products = jax.vmap(lambda v: hvp(params, batch, v))(basis)
        return subspace.flatten_rows(products)

    columns = jax.jit(
        columns,
        in_shardings=(ctx.param_sh, sharding.batch_sharding(ctx.mesh), repl),
        out_shardings=repl,
    )
    batches = passes.full_batches(
        ctx.split("train").num_examples, config.arnoldi.hvp_batch_size, ctx.mesh.shape[DATA_AXIS]
    )
    chunk = config.method.chunk
    starts = range(0, p, chunk)
    matrix = np.zeros((p, p), np.float64)
    guard = finite.Guard("exact", "a Hessian column", "check the trained params and the data")
    with ctx.progress("exact", len(starts)) as progress:
        for step, start in enumerate(starts, start=1):
            indices = np.arange(start, start + chunk)
            indices = jnp.asarray(np.where(indices < p, indices, -1), jnp.int32)
            total = None
            for positions in batches:
                part = columns(params, ctx.batch("train", positions), indices)
                total = part if total is None else total + part
            guard.update(step, total)
            guard.check("nothing of this fit was saved")
            block = sharding.replicated_to_host(total).astype(np.float64) / len(batches)
            stop = min(start + chunk, p)
            matrix[:, start:stop] = block[: stop - start].T
            progress(step)
    return matrix


def fit(ctx: Context, params: Any) -> Fitted:
    matrix = hessian(ctx, params)
    asymmetry = float(np.abs(matrix - matrix.T).max() / max(np.abs(matrix).max(), 1e-30))
    matrix = 0.5 * (matrix + matrix.T)
    eigvals, eigvecs = np.linalg.eigh(matrix)
    order = np.argsort(-np.abs(eigvals), kind="stable")
    eigvals, eigvecs = eigvals[order], eigvecs[:, order]
    residuals = np.linalg.norm(matrix @ eigvecs - eigvecs * eigvals, axis=0)
    g = jax.jit(
        lambda m: subspace.unflatten_rows(m, ctx.vectors_like),
        out_shardings=sharding.stacked_shardings(ctx.vector_sh),
    )(jax.device_put(eigvecs.T.astype(np.float32), sharding.replicated(ctx.mesh)))
    floor = ctx.config.l2 + ctx.config.distill.damping
    nonpositive = int((eigvals + ctx.config.distill.damping <= 0).sum())
    if nonpositive:
        logging.warning(
            "exact: %d of %d eigenvalues of H + damping are <= 0 (smallest %.3e): the trained "
            "params are not at a minimum, and 1/λ of those directions dominates the scores; "
            "raise distill.damping",
            nonpositive,
            eigvals.size,
            eigvals.min() + ctx.config.distill.damping,
        )
    logging.info(
        "exact: %d eigenvalues in [%.3e, %.3e] (l2 + damping = %.3e); relative asymmetry %.1e",
        eigvals.size,
        eigvals.min(),
        eigvals.max(),
        floor,
        asymmetry,
    )
    return fitted(
        g, eigvals, residuals, eigvals.size, asymmetry=asymmetry, num_nonpositive=nonpositive
    )


def _check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    if config.method.chunk < 1:
        raise InputError(f"method.chunk={config.method.chunk} must be at least 1")
    checks.hvp_batch(config, mesh)


def _check_size(config: ml_collections.ConfigDict, selected: Any) -> None:
    num_params = pytree.num_params(selected)
    limit = config.method.max_params
    if num_params > limit:
        raise InputError(
            f"method.name=exact needs the explicit {num_params} × {num_params} Hessian, more than "
            f"method.max_params={limit} params allow ({num_params**2 * 8 / 2**30:.1f} GiB in "
            "float64): use arnoldi, select fewer params (config.params), or raise "
            "method.max_params"
        )


CONFIG = (
    Block(
        "method",
        {
            "max_params": 20_000,  # exact: the largest p whose p × p Hessian it builds
            "chunk": 64,  # exact: Hessian columns per vmapped HVP call
        },
    ),
    Block("arnoldi", {"hvp_batch_size": 512}),  # the batches its full-data Hessian sums over
)

EXACT = Method(
    name="exact",
    kind=Kind.EIGENPAIR,
    equation="H⁻¹ = V diag(1/λ) Vᵀ, every eigenpair of the explicit full-data Hessian",
    config=CONFIG,
    num_vectors=lambda config, num_params: num_params,
    reference=True,
    fit=fit,
    check=_check,
    check_size=_check_size,
)
