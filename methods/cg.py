"""Conjugate gradient (Martens 2010; Koh & Liang 2017 §3): (H + λI)⁻¹ v for the Hessian H of the
mean loss over the *whole* training split (the matrix ``exact`` forms, + l2 I), λ =
``method.damping``, each row to a relative residual of ``method.tol`` or ``method.max_iters``
steps (``influence/solvers.py``). Every step is one pass of block HVPs over the training split
in equal batches of at most ``method.hvp_batch_size``.

Nothing to fit: the query gradients are solved once at score time (train → test, the use it is
meant for: a few queries), and self-influence solves every example's gradient, a whole CG run
per block of ``method.block`` examples (the score job times the first batches and warns above 10
minutes). H + λI must be positive definite: a non-positive curvature met along the way stops
the job with one line naming the fix; a solve that reaches ``method.max_iters`` is a warning with
its residual.
"""

from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from influence import solvers
from methods import checks, passes
from methods.base import Context, Kind, Method
from methods.lissa import chunks, unchunk
from parallel import sharding
from runtime.config import Block
from runtime.errors import InputError


class ConjugateGradient:
    """The ``Operator`` of CG at ``params`` (module docstring)."""

    def __init__(self, ctx: Context, params: Any) -> None:
        self._config = ctx.config.method
        self._stacked = sharding.stacked_shardings(ctx.vector_sh)
        self._hessian = passes.FullHessian(ctx, params)
        repl = sharding.replicated(ctx.mesh)
        s = self._stacked
        self._update = jax.jit(
            solvers.cg_update,
            in_shardings=(s, s, s, repl, s, repl),
            out_shardings=(s, s, s, repl, repl),
        )

    def solve(self, vectors: Any) -> Any:
        m = self._config
        out = []
        for block in chunks(vectors, m.block, self._stacked):
            try:
                result = solvers.conjugate_gradient(
                    self._hessian,
                    block,
                    damping=float(m.damping),
                    tol=float(m.tol),
                    max_iters=int(m.max_iters),
                    step=self._update,
                )
            except solvers.NegativeCurvatureError as e:
                raise InputError(f"method.name=cg: {e} (method.damping)") from e
            log = logging.info if result.converged else logging.warning
            log(
                "cg: a block of %d rows in %d steps (%d HVP batches each), relative residual "
                "≤ %.2e%s",
                len(result.residuals),
                result.iterations,
                self._hessian.num_batches,
                float(np.max(result.residuals)),
                ""
                if result.converged
                else f": method.tol={m.tol} not reached in method.max_iters={m.max_iters} "
                "steps; raise method.max_iters or method.damping",
            )
            out.append(result.solution)
        return unchunk(out, jax.tree.leaves(vectors)[0].shape[0])


def _check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    checks.solver(config, mesh)
    checks.tolerance(config)


CG = Method(
    name="cg",
    equation="(H + λI)⁻¹v by conjugate gradient on the full-data H",
    kind=Kind.OPERATOR,
    config=(
        Block(
            "method",
            {
                "damping": 1e-3,  # λ: it solves (H + λI) x = v (H includes l2)
                "hvp_batch_size": 512,  # examples per HVP call of the full-data H
                "block": 64,  # vectors solved by one vmapped HVP call
                "tol": 1e-4,  # relative residual
                "max_iters": 200,  # iteration cap (a warning if hit)
            },
        ),
    ),
    fingerprint=("method.damping", "method.tol", "method.max_iters"),
    check=_check,
    operator=lambda ctx, params, state: ConjugateGradient(ctx, params),
)
