"""HyperINF (Zhou, Fan & Jaggi 2024): per adapted matrix, the damped generalized Fisher matrix
(GFIM) A_l + λ_l I, inverted with Schulz's iteration X ← X(2I − AX) (``influence/schulz.py``).

Every selected leaf l (a LoRA factor: A (r × d_in), B (d_out × r)) has per-example gradients G_i
seen as r × d rows (``influence/gfim.py``: d the larger side); its curvature is the d × d

    A_l = (1/N) Σ_i G_iᵀ G_i,   λ_l = method.damping_ratio · mean(G²) + method.damping + l2,

accumulated over the training split in one data-parallel pass (per-device partial sums, one
all-reduce per leaf), then inverted on device from a start that always converges (X₀ = I/‖A‖_∞,
not the public code's 5·10⁻⁵ I, which diverges once λ_max > 4·10⁴) until ‖I − AX‖_F/√d ≤
``method.tol`` (at most ``method.max_iters`` steps; not reaching it is a warning with the
residual, also written to fit.json). P = blockdiag_l(I_r ⊗ X_l): a gradient's rows times
X_l, leaf by leaf, so self-influence is Σ_l ⟨G_l X_l, G_l⟩ and the validation influence
⟨∇ℓ(x), P v̄⟩ the papers' −Σ_l ⟨v̄_l X_l, G_l⟩ up to the sign (``stages/evaluate.py`` ranks by
the harm, its negative).

The fitted state (both A_l + λ_l I and X_l, replicated: d² floats each) is saved by the fit job
with the method's fingerprint; a leaf wider than ``method.max_layer_params`` (d² would not fit)
or of more than 2 dimensions (a conv kernel) is a one-line error before any work (training
included).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from influence import gfim, schulz
from influence.selection import leaf_paths
from methods import checks, passes
from methods.base import Context, Kind, Method, empty_fitted
from parallel import sharding
from runtime import finite
from runtime.config import Block
from runtime.errors import InputError


def check_leaves(
    config: ml_collections.ConfigDict, selected: Any, side: Callable[[tuple[int, ...]], int]
) -> None:
    """Every selected leaf is 1-D or 2-D and ``side(shape)`` (the side of the matrix this method
    forms per leaf) at most ``method.max_layer_params``; one line naming the leaf otherwise. A
    ``check_size``: every stage's set-up runs it, so it stops a pipeline before training."""
    name, limit = config.method.name, config.method.max_layer_params
    for path, leaf in zip(leaf_paths(selected), jax.tree.leaves(selected), strict=True):
        if leaf.ndim not in (1, 2):
            raise InputError(
                f"method.name={name} forms a matrix per 1-D or 2-D leaf; {path} has shape "
                f"{leaf.shape}: select the adapters or dense layers only (config.params)"
            )
        if side(leaf.shape) > limit:
            raise InputError(
                f"method.name={name}: leaf {path} {leaf.shape} needs a {side(leaf.shape)} × "
                f"{side(leaf.shape)} matrix, more than method.max_layer_params={limit}; select "
                "fewer params (config.params) or raise it"
            )


def rows_side(shape: tuple[int, ...]) -> int:
    """d of a leaf seen as r × d rows (``influence.gfim.as_rows``)."""
    return max(shape)


def _statistics(grads: Any, mask: jax.Array) -> Any:
    """Per leaf: (Σ_i m_i G_iᵀ G_i, Σ_i m_i ‖G_i‖²) of a device's rows."""

    def leaf(g: jax.Array) -> tuple[jax.Array, jax.Array]:
        rows = gfim.stacked_rows(g).astype(jnp.float32)
        outer = jnp.einsum("n,nrd,nre->de", mask, rows, rows, precision=gfim.HIGHEST)
        return outer, jnp.tensordot(mask, jnp.sum(jnp.square(rows), axis=(1, 2)), axes=1)

    return jax.tree.map(leaf, grads)


def fit(ctx: Context, params: Any) -> Any:
    config, m = ctx.config, ctx.config.method
    sums, count = passes.gradient_statistics(
        ctx, params, _statistics, "hyperinf GFIM", config.score.batch_size
    )
    paths = leaf_paths(ctx.vectors_like)
    repl = sharding.replicated(ctx.mesh)
    damped, inverses, layers = [], [], []
    invert = jax.jit(
        lambda a: schulz.schulz_inverse(a, tol=m.tol, max_iters=m.max_iters),
        out_shardings=repl,
    )
    pairs = jax.tree.leaves(sums, is_leaf=lambda x: isinstance(x, tuple))
    for path, like, (outer, sq) in zip(
        paths, jax.tree.leaves(ctx.vectors_like), pairs, strict=True
    ):
        d = rows_side(like.shape)
        mean_square = float(sq) / (count * like.size)
        lam = m.damping_ratio * mean_square + m.damping + config.l2
        a = outer / count + lam * jnp.eye(d, dtype=jnp.float32)
        result = invert(a)
        residual, iters = float(result.residual), int(result.iterations)
        if not np.isfinite(residual):
            raise finite.NonFiniteError(
                f"hyperinf: Schulz's iteration on {path} gave a non-finite residual; check the "
                "trained params and the data for non-finite values"
            )
        if not bool(result.converged):
            logging.warning(
                "hyperinf: %s: Schulz stopped at ‖I − AX‖_F/√d = %.2e after %d iterations, above "
                "method.tol=%g (κ·ε is the float32 floor: raise method.damping or method.tol)",
                path,
                residual,
                iters,
                m.tol,
            )
        layers.append(
            {"leaf": path, "d": d, "damping": lam, "iterations": iters, "residual": residual}
        )
        damped.append(a)
        inverses.append(result.inverse)
    logging.info(
        "hyperinf: %d GFIMs inverted, %d–%d Schulz iterations, largest residual %.2e",
        len(layers),
        min(x["iterations"] for x in layers),
        max(x["iterations"] for x in layers),
        max(x["residual"] for x in layers),
    )
    treedef = jax.tree.structure(ctx.vectors_like)
    state = {
        "damped_gfim": jax.tree.unflatten(treedef, damped),
        "inverse": jax.tree.unflatten(treedef, inverses),
    }
    summary = {"num_examples": count, "layers": layers, "converged": all_converged(layers, m.tol)}
    return empty_fitted(ctx.vectors_like, summary, state)


def all_converged(layers: list[dict], tol: float) -> bool:
    return all(x["residual"] <= tol for x in layers)


def operator_like(ctx: Context) -> Any:
    """The saved state's restore target: (d, d) float32 per leaf, twice, replicated."""
    repl = sharding.replicated(ctx.mesh)
    square = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((rows_side(x.shape),) * 2, jnp.float32, sharding=repl),
        ctx.vectors_like,
    )
    return {"damped_gfim": square, "inverse": square}


class RowInverse:
    """The ``Operator``: each stacked vector's leaves, as rows, times their X_l."""

    def __init__(self, ctx: Context, state: dict[str, Any]) -> None:
        self._inverse = state["inverse"]

        def solve(vectors: Any, inverse: Any) -> Any:
            return jax.tree.map(
                lambda v, x: jax.vmap(gfim.apply_inverse, in_axes=(0, None))(v, x),
                vectors,
                inverse,
            )

        self._solve = jax.jit(solve)

    def solve(self, vectors: Any) -> Any:
        return self._solve(vectors, self._inverse)


def _check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    checks.layerwise(config, mesh)
    checks.tolerance(config)


# The fields of the per-layer methods (hyperinf, datainf).
LAYER_FIELDS = {
    # λ_l = damping_ratio · mean of the layer's squared gradient entries + damping
    "damping": 1e-3,
    "damping_ratio": 0.1,  # the papers' 0.1
    "max_layer_params": 16_384,  # the largest GFIM side d (hyperinf), layer size p_l (datainf)
}

HYPERINF = Method(
    name="hyperinf",
    equation="P = blockdiag_l(I_r ⊗ (A_l + λ_l I)⁻¹), A_l the GFIM, inverted by Schulz",
    kind=Kind.OPERATOR,
    config=(
        Block(
            "method",
            {
                **LAYER_FIELDS,
                "tol": 1e-4,  # Schulz's residual ‖I − AX‖
                "max_iters": 200,  # Schulz's iteration cap (a warning if hit)
            },
        ),
    ),
    fingerprint=("method.damping", "method.damping_ratio", "method.tol", "method.max_iters"),
    fit=fit,
    check=_check,
    operator=lambda ctx, params, state: RowInverse(ctx, state),
    operator_like=operator_like,
    check_size=lambda config, selected: check_leaves(config, selected, rows_side),
)
