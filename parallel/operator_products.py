"""Scoring by an ``Operator`` (``methods/base.py``): LiSSA, CG, HyperINF, DataInf, EK-FAC.

These methods have no eigenvectors to project onto: their self-influence is the quadratic form
⟨∇ℓ(x), P∇ℓ(x)⟩ of each example's own gradient under their approximation P ≈ (H + λI)⁻¹, so each
batch needs its per-example gradients (one vmapped backward pass, each device its own rows), P
applied to all of them (``Operator.solve``: a per-layer product for HyperINF and DataInf, an
iterative solve over HVPs for LiSSA and CG), and the row-wise products; the products with the
query and validation tangents (P∇ℓ(z), P v̄) come from the same gradients. The rows have the
products' shape, (dots with the tangents, the quadratic form), so the score job's parts,
resumption and outputs are shared with every other method.

LiSSA and CG cost a whole solve per example (depth or CG steps × a block of HVPs): the first two
batches are timed (the second runs compiled) and the estimate for the run logged, as a warning
above ``SLOW_SECONDS``.
"""

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from influence import solvers
from influence.selection import Selection
from parallel import programs, sharding
from parallel.mesh import DATA_AXIS
from parallel.products import Rows

SLOW_SECONDS = 600.0  # an estimated scoring time above this is a warning


class OperatorProgram:
    """``program(params, tangents, local_batch) -> Rows``: rows [⟨∇ℓ(x), t_j⟩ for the k
    stacked tangents | ⟨∇ℓ(x), P∇ℓ(x)⟩], P = ``solve`` (None: no self-influence, the products
    alone); ``num_steps`` batches are to be scored (for the time estimate of the first)."""

    def __init__(
        self,
        per_example_loss: Callable,
        param_sh: Any,
        mesh: Mesh,
        selection: Selection | None,
        solve: Callable[[Any], Any] | None,
        *,
        batch_size: int,
        num_steps: int,
        name: str,
    ) -> None:
        self._rows = programs.jit_example_rows(per_example_loss, param_sh, mesh, selection)
        self._solve, self._mesh, self._batch_size = solve, mesh, batch_size
        self._num_steps, self._name = num_steps, name
        self._calls, self._seconds = 0, []
        rows_sh = NamedSharding(mesh, P(DATA_AXIS, None))

        def finish(dots: jax.Array, grads: Any, solved: Any) -> tuple[jax.Array, jax.Array]:
            g = dots
            if solved is not None:
                g = jnp.concatenate([dots, solvers.row_dots(grads, solved)[:, None]], axis=1)
            return g, jnp.all(jnp.isfinite(g))

        self._finish = jax.jit(finish, out_shardings=(rows_sh, sharding.replicated(mesh)))

    def __call__(self, params: Any, tangents: Any, local: dict) -> Rows:
        start = time.perf_counter()
        batch = sharding.to_global(local, self._mesh, self._batch_size)
        grads, dots = self._rows(params, tangents, batch)
        solved = self._solve(grads) if self._solve is not None else None
        projected = Rows([self._finish(dots, grads, solved)])
        self._calls += 1
        if self._calls <= 2:  # the second batch runs compiled: it times the rest
            projected.wait()
            self._seconds.append(time.perf_counter() - start)
            if self._calls == 2 or self._num_steps == 1:
                self._estimate()
        return projected

    def _estimate(self) -> None:
        first, *rest = self._seconds
        per_batch = rest[0] if rest else first
        total = first + per_batch * (self._num_steps - 1)
        log = logging.warning if total > SLOW_SECONDS else logging.info
        log(
            "%s: scoring took %.1f s for the first batch of %d (compilation included), "
            "%.1f s for the next: about %.0f s (%.1f h) for the %d batches of this run%s",
            self._name,
            first,
            self._batch_size,
            per_batch,
            total,
            total / 3600,
            self._num_steps,
            (
                "; each example costs a whole solve: lower the solver's depth or iterations, "
                "score fewer examples, or use arnoldi"
                if total > SLOW_SECONDS
                else ""
            ),
        )
