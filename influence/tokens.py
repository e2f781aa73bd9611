"""Influence split by token: which tokens of a training passage x made it a proponent of a query z.

A sequence model's per-example loss is a sum of per-token terms, ℓ(x) = Σ_t ℓ_t(x) (each term a
token's share: the LM's ``w_t · ce_t``, ``tasks/base.py`` ``per_token_loss``). The influence of x
on z (Schioppa et al. 2022, Alg. 1 line 26; Koh & Liang 2017, eq. 2) is

    I(x, z) = ⟨∇ℓ(x), P ∇L(z)⟩,   P ≈ H⁻¹ the configured method's approximation,

and the dot product is linear in its first argument, so with v = P∇L(z)

    I(x, z) = Σ_t ⟨∇ℓ_t(x), v⟩ = Σ_t c_t(x),   c_t(x) = ⟨∇ℓ_t(x), v⟩:

token t's contribution c_t, and the contributions sum to the influence exactly (no approximation
beyond P's). Every c_t(x) of every token of every example of a batch is one directional
derivative of the (batch, length) per-token losses along v: ONE forward-mode JVP, no per-token or
per-example gradient materialised (a reverse pass would need one backward pass per token). For k
queries the forward pass is linearised once and the linear map vmapped over the k stacked
tangents, as ``influence.scoring.make_forward_products`` does for eigenvectors.
"""

from collections.abc import Callable

import jax

from influence import scoring
from influence.selection import Selection
from influence.types import Batch, Params

PerTokenLoss = Callable[[Params, Batch], jax.Array]
TokenProducts = Callable[[Params, Params, Batch], jax.Array]


def make_token_products(
    per_token_loss: PerTokenLoss,
    selection: Selection | None = None,
    tangent_chunk: int | None = None,
) -> TokenProducts:
    """Return ``contributions(params, tangents, batch) -> (batch, k, length)``: c_t(x) =
    ⟨∇ℓ_t(x), v_j⟩ for each of the k stacked ``tangents`` v_j (module docstring); summed over the
    last axis, the influences ⟨∇ℓ(x), v_j⟩.

    The tangents span the ``selection``'s leaves: the other leaves are held fixed, i.e. their
    tangent is zero (``Selection.merge`` puts them back inside the differentiated function).
    ``tangent_chunk`` bounds memory at chunk × batch activations (``lax.map`` over chunks of
    tangents) instead of k × batch.

    It is ``make_forward_products`` on the per-token losses: that program's JVP keeps whatever
    axes the loss returns after the example axis, here the tokens'."""
    return scoring.make_forward_products(per_token_loss, tangent_chunk, selection)
