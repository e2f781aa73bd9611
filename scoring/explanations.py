"""One streamed pass over the training split for ``jobs.explain``: every example's influence on k
query losses and its tokens' shares of it, kept as a running top-k per query.

For k preconditioned query gradients v_j = P∇L(z_j) (``scoring.tangents.Preconditioner``) each
batch of ``score.batch_size`` training examples, sharded over the mesh's 'data' axis, goes through
one program (``parallel.programs.jit_token_products``): the per-token contributions
c_t(x) = ⟨∇ℓ_t(x), v_j⟩ by one forward-mode JVP of ``Task.per_token_loss``, whose row sums are the
influences I(x, z_j) = ⟨∇ℓ(x), P∇L(z_j)⟩ exactly (``influence/tokens.py``). The contributions
come back replicated (k × length floats a row), every process merges the batch into the same
running top-k of proponents (largest influence) and opponents (smallest) per query, keeping each
candidate's contributions beside it, so what is held is one batch and 2 × top_k × k rows.
"""

import dataclasses
from typing import Any

import numpy as np

from methods.base import Context
from parallel import programs, sharding
from runtime import finite, prefetch
from scoring.queries import KINDS, TopK
from tasks import batching


@dataclasses.dataclass(frozen=True)
class Ranked:
    """The top-k of one kind (proponent or opponent) for k queries: ``positions`` (top_k, k) in
    the training split (−1: an empty slot, fewer examples than top_k), ``influence`` (top_k, k)
    and ``tokens`` (top_k, k, length) contributions, rank 0 first."""

    positions: np.ndarray
    influence: np.ndarray
    tokens: np.ndarray


def trace(ctx: Context, params: Any, tangents: Any, num_queries: int, top_k: int) -> dict:
    """{kind: ``Ranked``} over the whole training split (module docstring); ``tangents`` are the
    ``num_queries`` stacked v_j, laid out like G."""
    s, source = ctx.config.score, ctx.split("train")
    program = programs.jit_token_products(
        ctx.task.per_token_loss,
        ctx.param_sh,
        ctx.vector_sh,
        ctx.mesh,
        ctx.selection,
        s.tangent_chunk or None,
    )
    batches = list(batching.padded_batches(0, source.num_examples, s.batch_size))
    rows = sharding.local_rows(ctx.mesh, s.batch_size)

    def read(step: int) -> tuple[np.ndarray, np.ndarray, dict]:
        positions, mask = batches[step]
        return positions, mask, ctx.task.model_inputs(source.take(positions[rows]))

    best: dict[str, TopK] = {}

    def collect(positions: np.ndarray, mask: np.ndarray, dispatched: Any) -> None:
        tokens = sharding.replicated_to_host(dispatched)[mask]  # (rows, k, length)
        influence = tokens.sum(axis=-1, dtype=np.float64).astype(np.float32)
        if not np.isfinite(tokens).all():
            raise finite.NonFiniteError(
                "explain: a token's influence is NaN or infinite; check the trained params, "
                "the method's fit and the prompts' losses for non-finite values"
            )
        values = np.concatenate([influence[..., None], tokens], axis=-1)
        for kind, sign in KINDS.items():
            if kind not in best:
                best[kind] = TopK(top_k, num_queries, values.shape[-1])
            best[kind].merge(slice(None), sign * influence, values, positions[mask])

    pending = None
    with ctx.progress("explain", len(batches)) as progress:
        reads = prefetch.ahead(read, 0, len(batches), s.read_threads, s.read_ahead)
        for step, (positions, mask, local) in enumerate(reads, start=1):
            batch = sharding.to_global(local, ctx.mesh, s.batch_size)
            current = (positions, mask, program(params, tangents, batch))
            if pending is not None:  # batch i + 1 is dispatched before batch i is fetched
                collect(*pending)
            pending = current
            progress(step)
        if pending is not None:
            collect(*pending)
    return {
        kind: Ranked(top.ids, top.values[..., 0], top.values[..., 1:]) for kind, top in best.items()
    }
