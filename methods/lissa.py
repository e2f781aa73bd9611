"""LiSSA (Agarwal, Bullins & Hazan 2017; Koh & Liang 2017 §3): (H + λI)⁻¹ v by the stochastic
Neumann recursion h_j = v + h_{j−1} − (H_j + λI) h_{j−1} / s, H_j the Hessian on a fresh batch
of ``method.hvp_batch_size`` examples, averaged over ``method.repeats`` runs of
``method.depth`` steps (``influence/solvers.py``); λ = ``method.damping``, s = ``method.scale``
(0: 1.5 × the largest eigenvalue of H + λI, estimated by 30 Lanczos steps on such a batch). A
λ below −λ_min(H) (a non-convex loss away from its minimum) makes the recursion diverge: Lanczos
estimates λ_min too, and that is a one-line error before any solve.

Nothing to fit: every vector is solved at score time. Train → test solves the query gradients
once (P∇ℓ(z), scored as products); self-influence ⟨∇ℓ(x), P∇ℓ(x)⟩ solves *every example's*
gradient, depth × repeats block HVPs per batch of examples: the cost Schioppa et al. 2022 call
prohibitive at scale. The score job times the first batches and warns above 10 minutes.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from influence import hvp as hvp_lib
from influence import pytree, solvers, subspace
from methods import checks
from methods.base import Context, Kind, Method
from parallel import sharding
from runtime import finite
from runtime.config import Block
from runtime.errors import InputError

LANCZOS_ITERATIONS = 30
SCALE_MARGIN = 1.5  # s = margin × estimated λ_max: the batch Hessians' spread, the estimate's bias


def check_batch(ctx: Context) -> None:
    """``method.hvp_batch_size`` fits in the training split (checked before any HVP)."""
    b, n = ctx.config.method.hvp_batch_size, ctx.split("train").num_examples
    if b > n:
        raise InputError(f"method.hvp_batch_size={b} exceeds the {n} training examples; lower it")


def chunks(vectors: Any, size: int, stacked_sh: Any) -> list[Any]:
    """The rows of a stacked pytree in consecutive blocks of ``size`` (the last one padded with
    zero rows, whose solution is zero), each laid out like the eigenvectors: every block one
    shape, so the vmapped HVP step compiles once for the queries, the validation gradient and
    every batch of examples."""
    count = jax.tree.leaves(vectors)[0].shape[0]

    def take(v: Any, start: int) -> Any:
        def leaf(x: jax.Array) -> jax.Array:
            rows = x[start : start + size]
            return jnp.pad(rows, [(0, size - rows.shape[0])] + [(0, 0)] * (x.ndim - 1))

        return jax.tree.map(leaf, v)

    take = jax.jit(take, static_argnums=1, out_shardings=stacked_sh)
    return [take(vectors, s) for s in range(0, count, size)]


def unchunk(blocks: list[Any], count: int) -> Any:
    """The first ``count`` rows of the blocks, stacked again."""
    return jax.tree.map(lambda *x: jnp.concatenate(x)[:count], *blocks)


class Lissa:
    """The ``Operator`` of LiSSA at ``params`` (module docstring)."""

    def __init__(self, ctx: Context, params: Any) -> None:
        check_batch(ctx)
        self._ctx, self._params, m = ctx, params, ctx.config.method
        self._stacked = sharding.stacked_shardings(ctx.vector_sh)
        hvp = hvp_lib.make_hvp(ctx.task.per_example_loss, ctx.config.l2, ctx.selection)
        self._scale = self._scale_for(hvp)
        damping, scale = float(m.damping), self._scale

        def step(params: Any, batch: dict, h: Any, v: Any) -> Any:
            hh = jax.vmap(lambda row: hvp(params, batch, row))(h)
            return solvers.lissa_update(h, v, hh, damping, scale)

        self._step = jax.jit(
            step,
            in_shardings=(
                ctx.param_sh,
                sharding.batch_sharding(ctx.mesh),
                self._stacked,
                self._stacked,
            ),
            out_shardings=self._stacked,
            donate_argnums=2,
        )
        logging.info(
            "lissa: λ = %g, s = %.4g, depth %d × %d repeats, batches of %d",
            damping,
            scale,
            m.depth,
            m.repeats,
            m.hvp_batch_size,
        )

    def _batch(self, stream: int, j: int) -> dict:
        """Step j's batch of stream 0 (the power iteration) or 1 + repeat: drawn without
        replacement, seeded by (method.seed, stream, j)."""
        m, train = self._ctx.config.method, self._ctx.split("train")
        rng = np.random.default_rng([m.seed, stream, j])
        positions = np.sort(rng.choice(train.num_examples, m.hvp_batch_size, replace=False))
        return self._ctx.batch("train", positions)

    def _spectrum(self, hvp: Any) -> tuple[float, float]:
        """(λ_max, λ_min) of H estimated by ``LANCZOS_ITERATIONS`` Lanczos steps on LiSSA's
        kind of batches (``influence.solvers.lanczos_extremes``)."""
        ctx, m = self._ctx, self._ctx.config.method
        product = jax.jit(
            hvp,
            in_shardings=(ctx.param_sh, sharding.batch_sharding(ctx.mesh), ctx.vector_sh),
            out_shardings=ctx.vector_sh,
        )
        start = jax.jit(
            lambda key: pytree.stacked_get(subspace.gaussian_rows(key, ctx.vectors_like, 1), 0),
            out_shardings=ctx.vector_sh,
        )(jax.random.key(m.seed))
        batch = self._batch(0, 0)  # one batch: a fixed operator, as Lanczos needs
        top, bottom = solvers.lanczos_extremes(
            lambda j, q: product(self._params, batch, q), start, LANCZOS_ITERATIONS
        )
        if not (np.isfinite(top) and np.isfinite(bottom)):
            raise finite.NonFiniteError(
                f"lissa: Lanczos on H gave λ ∈ [{bottom}, {top}]; check the trained params and "
                "the data"
            )
        return top, bottom

    def _scale_for(self, hvp: Any) -> float:
        """``method.scale``, or 1.5 × (λ_max + λ) estimated (other batches' Hessians may exceed
        this one's); a one-line error, before any solve, when H + λI has a negative eigenvalue
        (the recursion would diverge)."""
        m = self._ctx.config.method
        top, bottom = self._spectrum(hvp)
        logging.info("lissa: Lanczos: λ_max(H) ≈ %.4g, λ_min(H) ≈ %.4g", top, bottom)
        if bottom + m.damping <= 0:
            raise InputError(
                f"method.name=lissa: H has an eigenvalue ≈ {bottom:.3g} at these params (not a "
                f"minimum), so with method.damping={m.damping} LiSSA diverges; set "
                f"method.damping above {-bottom:.3g} (an estimate: leave a margin)"
            )
        return float(m.scale) or SCALE_MARGIN * (abs(top) + float(m.damping))

    def solve(self, vectors: Any) -> Any:
        """(H + λI)⁻¹ for every row, in blocks of ``method.block`` rows; the same batches for
        every block (each is read once per step)."""
        m = self._ctx.config.method
        blocks = chunks(vectors, m.block, self._stacked)
        total = [jax.tree.map(lambda x: x * 0, v) for v in blocks]
        for repeat in range(m.repeats):
            h = [jax.tree.map(lambda x: x + 0, v) for v in blocks]
            for j in range(m.depth):
                batch = self._batch(1 + repeat, j)
                h = [
                    self._step(self._params, batch, hi, v) for hi, v in zip(h, blocks, strict=True)
                ]
            total = [
                jax.tree.map(lambda t, x: t + x, t, hi) for t, hi in zip(total, h, strict=True)
            ]
        norm = self._scale * m.repeats
        count = jax.tree.leaves(vectors)[0].shape[0]
        solved = unchunk([jax.tree.map(lambda t: t / norm, t) for t in total], count)
        if not all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(solved)):
            raise finite.NonFiniteError(
                f"lissa diverged (s = {self._scale:.4g}, λ = {m.damping}): H + λI has "
                "eigenvalues outside (0, 2s) at these params; raise method.damping (a "
                "non-convex loss has negative curvature) or method.scale"
            )
        return solved


def _check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    checks.solver(config, mesh)
    m = config.method
    if m.depth < 1 or m.repeats < 1:
        raise InputError(
            f"method.depth={m.depth} and method.repeats={m.repeats} must be at least 1"
        )
    if not m.scale >= 0:
        raise InputError(f"method.scale={m.scale} must be >= 0 (0: estimated)")


LISSA = Method(
    name="lissa",
    equation="(H + λI)⁻¹v ≈ h_depth / s, h_j = v + h_{j−1} − (H_j + λI) h_{j−1} / s",
    kind=Kind.OPERATOR,
    config=(
        Block(
            "method",
            {
                "seed": 0,  # its HVP batches and the Lanczos start
                "damping": 1e-3,  # λ: it solves (H + λI) x = v (H includes l2)
                "hvp_batch_size": 512,  # examples per recursion step
                "depth": 1000,  # recursion steps per repeat
                "repeats": 1,  # independent recursions averaged
                "scale": 0.0,  # s ≥ λ_max(H + λ); 0: estimated (Lanczos)
                "block": 64,  # vectors solved by one vmapped HVP call
            },
        ),
    ),
    fingerprint=(
        "method.damping",
        "method.hvp_batch_size",
        "method.depth",
        "method.repeats",
        "method.scale",
        "method.seed",
    ),
    check=_check,
    operator=lambda ctx, params, state: Lissa(ctx, params),
)
