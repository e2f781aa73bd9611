"""Hessian-vector products of the mean training loss, forward-over-reverse.

Arnoldi (Schioppa et al. 2022, Algorithm 1, line 4) needs w = H v with H the Hessian of the training
loss on a batch of b examples. Forward-over-reverse (``jax.jvp`` of ``jax.grad``) costs ~1.5x a
gradient; reverse-over-reverse costs ~6x (measured, see benchmarks/speed.py), so it is the only
mode offered.
"""

from collections.abc import Callable

import jax

from influence import pytree
from influence.selection import Selection, restricted
from influence.types import Batch, Params, PerExampleLoss

HVP = Callable[[Params, Batch, Params], Params]


def make_mean_loss(per_example_loss: PerExampleLoss, l2: float = 0.0) -> Callable:
    """L(θ; batch) = mean_i ℓ(θ, x_i) + (l2 / 2)‖θ‖²: the objective whose Hessian we analyse."""

    def mean_loss(params: Params, batch: Batch) -> jax.Array:
        loss = per_example_loss(params, batch).mean()
        if l2:
            loss = loss + 0.5 * l2 * pytree.vdot(params, params)
        return loss

    return mean_loss


def make_hvp(
    per_example_loss: PerExampleLoss, l2: float = 0.0, selection: Selection | None = None
) -> HVP:
    """Return ``hvp(params, batch, v) = ∇²_θ L(θ; batch) v`` with L from ``make_mean_loss``.

    With a ``selection``, θ is the selected leaves only (``influence/selection.py``): ``params`` is
    the full tree, ``v`` and the result are shaped like ``selection.select(params)``, and the other
    leaves are constants (the block H_SS of the Hessian). The L2 term contributes ``l2 * v``
    exactly; it is added analytically rather than differentiated.
    """

    def hvp(params: Params, batch: Batch, v: Params) -> Params:
        loss, primal = restricted(per_example_loss, params, selection)
        mean_loss = make_mean_loss(loss)
        grad_fn = lambda p: jax.grad(mean_loss)(p, batch)  # noqa: E731
        _, hv = jax.jvp(grad_fn, (primal,), (v,))
        if l2:
            hv = pytree.axpy(l2, v, hv)
        return hv

    return hvp
