"""DataInf (Kwon, Wu, Wu & Zou 2023, eq. 5): per layer l with flattened per-example gradients
g_i ∈ R^{p_l}, the inverse of the average swapped for the average of Sherman–Morrison inverses,

    (A_l + λ_l I)⁻¹ ≈ (I − C_l) / λ_l,   C_l = (1/N) Σ_i g_i g_iᵀ / (λ_l + ‖g_i‖²)

(``influence/datainf.py``), λ_l = ``method.damping_ratio`` · mean(g²) + ``method.damping`` + l2
(the reference code's 0.1 · mean). Two data-parallel passes over the training split: the mean
squares (λ_l), then C_l. C_l is formed explicitly (p_l² floats per leaf, a LoRA factor of rank 8
on a 384-wide layer: 3,072² = 36 MiB), so P∇ℓ(x) costs a product per layer, and self-influence
⟨∇ℓ(x), P∇ℓ(x)⟩ is as cheap as HyperINF's; DataInf's own implementation never forms C_l and
applies the sum to each validation gradient instead (O(N p) per vector), which serves its
validation protocol but makes every self-influence a pass over the training set. A leaf of more
than ``method.max_layer_params`` entries is a one-line error before any work.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from influence.selection import leaf_paths
from methods import checks, hyperinf, passes
from methods.base import Context, Kind, Method, empty_fitted
from parallel import sharding
from runtime.config import Block

HIGHEST = jax.lax.Precision.HIGHEST


def _flat(g: jax.Array) -> jax.Array:
    return g.reshape(g.shape[0], -1).astype(jnp.float32)


def fit(ctx: Context, params: Any) -> Any:
    config, m = ctx.config, ctx.config.method
    batch_size = config.score.batch_size
    squares, count = passes.gradient_statistics(
        ctx,
        params,
        lambda grads, mask: jax.tree.map(
            lambda g: jnp.tensordot(mask, jnp.sum(jnp.square(_flat(g)), axis=1), axes=1), grads
        ),
        "datainf damping",
        batch_size,
    )
    sizes = jax.tree.map(lambda x: x.size, ctx.vectors_like)
    damping = jax.tree.map(
        lambda sq, p: jnp.float32(
            m.damping_ratio * float(sq) / (count * p) + m.damping + config.l2
        ),
        squares,
        sizes,
    )

    def weighted_outer(grads: Any, mask: jax.Array) -> Any:
        def leaf(g: jax.Array, lam: jax.Array) -> jax.Array:
            flat = _flat(g)
            weights = mask / (lam + jnp.sum(jnp.square(flat), axis=1))
            return jnp.matmul((flat * weights[:, None]).T, flat, precision=HIGHEST)

        return jax.tree.map(leaf, grads, damping)

    sums, _ = passes.gradient_statistics(
        ctx, params, weighted_outer, "datainf matrices", batch_size
    )
    repl = sharding.replicated(ctx.mesh)
    matrices = jax.jit(lambda s: jax.tree.map(lambda x: x / count, s), out_shardings=repl)(sums)
    layers = [
        {"leaf": path, "p": int(like.size), "damping": float(lam)}
        for path, like, lam in zip(
            leaf_paths(ctx.vectors_like),
            jax.tree.leaves(ctx.vectors_like),
            jax.tree.leaves(damping),
            strict=True,
        )
    ]
    logging.info(
        "datainf: %d layers, λ_l in [%.3e, %.3e]",
        len(layers),
        min(x["damping"] for x in layers),
        max(x["damping"] for x in layers),
    )
    state = {"matrix": matrices, "damping": jax.device_put(damping, repl)}
    return empty_fitted(ctx.vectors_like, {"num_examples": count, "layers": layers}, state)


def operator_like(ctx: Context) -> Any:
    """The saved state's restore target: C_l (p_l, p_l) and λ_l per leaf, replicated."""
    repl = sharding.replicated(ctx.mesh)
    return {
        "matrix": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((x.size, x.size), jnp.float32, sharding=repl),
            ctx.vectors_like,
        ),
        "damping": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((), jnp.float32, sharding=repl), ctx.vectors_like
        ),
    }


class ShermanMorrison:
    """The ``Operator``: (v − C_l v) / λ_l, leaf by leaf, for each stacked vector."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

        def solve(vectors: Any, state: dict[str, Any]) -> Any:
            def leaf(v: jax.Array, c: jax.Array, lam: jax.Array) -> jax.Array:
                flat = _flat(v)
                out = (flat - jnp.matmul(flat, c, precision=HIGHEST)) / lam
                return out.reshape(v.shape).astype(v.dtype)

            return jax.tree.map(leaf, vectors, state["matrix"], state["damping"])

        self._solve = jax.jit(solve)

    def solve(self, vectors: Any) -> Any:
        return self._solve(vectors, self._state)


DATAINF = Method(
    name="datainf",
    equation="(A_l + λ_l I)⁻¹ ≈ (I − C_l)/λ_l, C_l = (1/N) Σ g gᵀ/(λ_l + ‖g‖²), per layer",
    kind=Kind.OPERATOR,
    config=(Block("method", hyperinf.LAYER_FIELDS),),
    fingerprint=("method.damping", "method.damping_ratio"),
    fit=fit,
    check=checks.layerwise,
    operator=lambda ctx, params, state: ShermanMorrison(state),
    operator_like=operator_like,
    check_size=lambda config, selected: hyperinf.check_leaves(config, selected, math.prod),
)
