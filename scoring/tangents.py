"""What the score job projects every example onto, for each method (``stages/score.py``).

Every row the products program computes for an example x is, in this order (``row_layout.Layout``):

- g(x) = G∇ℓ(x), the p̃ projections onto the method's eigenvectors (none for the others);
- ⟨∇ℓ(x), t_q⟩ for each traced query z_q: t_q = ∇ℓ(z_q) where the tail or the method's own σ
  needs the full-gradient products (``influence.scoring.influence``), t_q = P∇ℓ(z_q) for an
  ``Operator`` method, whose products are then the influences themselves;
- ⟨∇ℓ(x), P v̄⟩ with ``score.validation``: v̄ = the mean gradient over the eval split, P the
  method's approximation of H⁻¹ (eigenpair methods: Gᵀdiag(1/λ)G, plus the tail's
  (I − GᵀG)/σ where set; ``influence.scoring.apply_inverse``): the influence of x on the mean
  validation loss, the protocol of DataInf and HyperINF (Kwon et al. 2023; Zhou et al. 2024);
- ‖∇ℓ(x)‖² where a σ is set, or ⟨∇ℓ(x), P∇ℓ(x)⟩ for an ``Operator`` method (its
  self-influence, ``parallel/operator_products.py``).

TracIn repeats this at each kept checkpoint, its rows summed with the learning rates.

``score.eigvecs_storage`` says where these rows live while every batch is projected onto them: on
the devices (``device``), or in host memory, streamed to them a chunk at a time by forward mode
(``host``: ``parallel/tangent_stream.py``, ``parallel/streamed_products.py``; G of a 1B–8B model
does not fit in HBM). ``auto`` keeps them on the devices when they take at most half of
``score.memory_budget_mb``'s budget.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from influence import scoring
from methods import passes
from methods.base import Context, Kind, Operator
from methods.basis_storage import GIB, available_host_bytes
from parallel import offload, operator_products, products, sharding, streamed_products
from parallel.tangent_stream import HostTangents, apply_inverse
from runtime.errors import InputError
from scoring import queries, row_layout


def mean_gradient(ctx: Context, params: Any) -> Any:
    """v̄ = (1/M) Σ_z ∇ℓ(z) over the M examples of the eval split (one data-parallel pass),
    stacked as one row laid out like the eigenvectors."""
    total, count = passes.gradient_statistics(
        ctx,
        params,
        lambda grads, mask: jax.tree.map(lambda g: jnp.tensordot(mask, g, axes=1), grads),
        "validation gradient",
        ctx.config.score.batch_size,
        split="eval",
    )
    stacked = sharding.stacked_shardings(ctx.vector_sh)
    return jax.jit(lambda t: jax.tree.map(lambda x: (x / count)[None], t), out_shardings=stacked)(
        total
    )


def layout(
    ctx: Context, num_vectors: int, sigma: float | None, intrinsic: bool
) -> row_layout.Layout:
    """The columns of the program's rows (module docstring); an ``Operator`` method's σ is 1
    (its products are the influences) and its last column its self-influence."""
    operator = ctx.method.kind is Kind.OPERATOR
    return row_layout.Layout(
        0 if operator else num_vectors,
        min(ctx.config.score.num_queries, ctx.split("eval").num_examples)
        if ctx.config.score.num_queries and (sigma is not None or operator)
        else 0,
        sigma=1.0 if operator else sigma,
        intrinsic=intrinsic or operator,
        validation=bool(ctx.config.score.validation),
        quadratic=operator,
        self_influence=bool(ctx.config.score.self_influence) or not operator,
    )


def storage(ctx: Context) -> str:
    """Where the tangents live, ``device`` or ``host`` (``score.eigvecs_storage``; module
    docstring): auto weighs the most rows there can be (p̃, the queries, v̄) against the budget,
    and keeps them on the devices for an operator method or ``score.mode=reverse``."""
    s = ctx.config.score
    if s.eigvecs_storage == "host" and offload.host_memory_kind() is None:
        raise InputError(
            "score.eigvecs_storage=host: the devices have no host memory kind to keep the "
            "eigenvectors in; set score.eigvecs_storage=device"
        )
    if s.eigvecs_storage != "auto" or ctx.method.kind is Kind.OPERATOR or s.mode == "reverse":
        return "device" if s.eigvecs_storage == "auto" else s.eigvecs_storage
    num_rows = ctx.method.vectors(ctx.config, ctx.selection.num_params(ctx.params_like))
    num_rows += s.num_queries + int(bool(s.validation))
    need = num_rows * offload.row_bytes(ctx.vectors_like, ctx.vector_sh)[0]
    budget = products.budget_bytes(s.memory_budget_mb)
    where = "device" if need <= budget // 2 else "host"
    logging.info(
        "score.eigvecs_storage=auto: %s (%d tangents take %.0f MiB per device; budget %.0f MiB)",
        where,
        num_rows,
        need / products.MIB,
        budget / products.MIB,
    )
    return where


def build(
    ctx: Context,
    models: list[tuple[Any, float]],
    eig_state: dict[str, Any],
    eigvals: np.ndarray,
    rows: row_layout.Layout,
    where: str = "device",
) -> tuple[list[tuple[Any, Any, float]], Operator | None]:
    """([(params, tangents, weight)] of every scored model, the method's ``Operator`` or None):
    the tangents in the order of the ``rows`` layout (module docstring), ``HostTangents`` where
    ``where`` is host. ``models``: [(params, weight)], the final params with weight 1, or
    TracIn's kept checkpoints with their learning rates (``Method.checkpoints``)."""
    if where == "host":
        return [(at, _host(ctx, at, eig_state, eigvals, rows), w) for at, w in models], None
    num_queries = ctx.config.score.num_queries
    operator = operator_of(ctx, models[-1][0], eig_state)
    stacked = sharding.stacked_shardings(ctx.vector_sh)
    concat = jax.jit(
        lambda *trees: jax.tree.map(lambda *x: jnp.concatenate(x), *trees), out_shardings=stacked
    )
    inverse = Preconditioner(ctx, eig_state, eigvals, rows.sigma, rows.intrinsic, operator)
    weighted = []
    for at, weight in models:
        tangents = []
        if rows.num_dots:
            tangents.append(queries.query_gradients(ctx, at, num_queries))
        if rows.validation:
            tangents.append(mean_gradient(ctx, at))
        if tangents and operator is not None:  # one solve for all of them
            tangents = [inverse(concat(*tangents) if len(tangents) > 1 else tangents[0])]
        elif rows.validation:  # P v̄
            tangents[-1] = inverse(tangents[-1])
        vectors = concat(eig_state["eigvecs"], *tangents) if tangents else eig_state["eigvecs"]
        weighted.append((at, vectors, weight))
    return weighted, operator


def operator_of(ctx: Context, params: Any, eig_state: dict[str, Any]) -> Operator | None:
    """The ``Operator`` P of an ``OPERATOR`` method at ``params`` (its fitted state, if any,
    from ``eig_state``); None for the other kinds."""
    if ctx.method.kind is not Kind.OPERATOR:
        return None
    return ctx.method.operator(ctx, params, eig_state.get("operator"))


class Preconditioner:
    """``P(vectors)``: P v for each row of stacked ``vectors`` laid out like G, P the method's
    approximation of H⁻¹ (``methods/base.py``), so that ⟨∇ℓ(x), P v⟩ is the influence of x on
    whatever v is the gradient of (Koh & Liang 2017, eq. 2): the mean validation loss
    (``score.validation``), a query's loss (``jobs.explain``). By kind:

    - ``OPERATOR``: ``operator.solve(v)``;
    - ``GRADIENT`` (``intrinsic``: H = σI, σ the method's own): v / σ;
    - ``EIGENPAIR``: Gᵀ diag(1/λ) G v, plus (v − GᵀG v)/σ with the tail's σ
      (``influence.scoring.apply_inverse``), λ the eigenvalues as scored (damping added).
    """

    def __init__(
        self,
        ctx: Context,
        eig_state: dict[str, Any],
        eigvals: np.ndarray,
        sigma: float | None,
        intrinsic: bool,
        operator: Operator | None,
    ) -> None:
        self._operator, self._intrinsic, self._sigma = operator, intrinsic, sigma
        self._eigvecs, self._eigvals = eig_state["eigvecs"], jnp.asarray(eigvals)
        self._inverse = jax.jit(
            lambda g, lam, v: scoring.apply_inverse(g, lam, v, sigma),
            out_shardings=sharding.stacked_shardings(ctx.vector_sh),
        )

    def __call__(self, vectors: Any) -> Any:
        if self._operator is not None:
            return self._operator.solve(vectors)
        if self._intrinsic:  # H = σI: P v = v / σ
            return jax.tree.map(lambda x: x / self._sigma, vectors)
        return self._inverse(self._eigvecs, self._eigvals, vectors)


def method_sigma(
    ctx: Context, eigvals: np.ndarray, eig_meta: dict[str, Any]
) -> tuple[float | None, bool]:
    """(σ, intrinsic): a ``GRADIENT`` method's own σ (graddot: H = I; its plain scores), else
    ``distill.tail``'s σ beside the plain scores (None without a tail); a σ the tail cannot
    have is a one-line ``InputError``."""
    if ctx.method.kind is Kind.GRADIENT:
        return ctx.method.sigma, True
    d = ctx.config.distill
    try:
        sigma = scoring.tail_sigma(
            d.tail,
            l2=ctx.config.l2,
            damping=d.damping,
            ritz_values=eig_meta.get("all_ritz_values", []),
            top_k=eigvals.size,
        )
    except ValueError as e:
        raise InputError(str(e)) from e
    return sigma, False


def _host(
    ctx: Context, at: Any, eig_state: dict[str, Any], eigvals: np.ndarray, rows: row_layout.Layout
) -> HostTangents:
    """The tangents of one model in host memory, in chunks sized to the budget (two chunks take
    at most half of it); P v̄ streamed over G's chunks and written in v̄'s row."""
    s = ctx.config.score
    pieces = [eig_state["eigvecs"]]
    if rows.num_dots:
        pieces.append(queries.query_gradients(ctx, at, s.num_queries))
    if rows.validation:
        v = mean_gradient(ctx, at)
        pieces.append(jax.tree.map(lambda x: x / rows.sigma, v) if rows.intrinsic else v)
    row_device, row_process = offload.row_bytes(ctx.vectors_like, ctx.vector_sh)
    num_rows = sum(jax.tree.leaves(p)[0].shape[0] for p in pieces)
    need, have = num_rows * row_process, available_host_bytes()
    if need > have:  # the chunks are cut beside the pieces: the rows twice, briefly
        raise InputError(
            f"score.eigvecs_storage=host: {num_rows} tangents need {need / GIB:.2f} GiB more host "
            f"memory on this process and {have / GIB:.2f} GiB is available; lower distill.top_k "
            "or score.num_queries, or use more processes"
        )
    budget = products.budget_bytes(s.memory_budget_mb)
    width = s.tangent_chunk or max(1, budget // (4 * row_device))
    try:
        tangents = HostTangents(pieces, width, ctx.vector_sh)
    except ValueError as e:
        raise InputError(str(e)) from e
    if rows.validation and not rows.intrinsic:
        inverse = apply_inverse(tangents, rows.num_vectors, eigvals, pieces[-1], rows.sigma)
        tangents.set_row(tangents.num_rows - 1, inverse)
    logging.info(
        "score.eigvecs_storage=host: %d tangents in %d chunks of %d, %.0f MiB per chunk per device",
        tangents.num_rows,
        tangents.num_chunks,
        tangents.width,
        tangents.width * row_device / products.MIB,
    )
    return tangents


def program(
    ctx: Context,
    operator: Operator | None,
    rows: row_layout.Layout,
    num_steps: int,
    where: str = "device",
) -> products.Program | operator_products.OperatorProgram | streamed_products.StreamedProgram:
    """The products program of the rows: per-example gradients and ``operator.solve`` for an
    ``Operator`` method, forward mode over chunks of tangents in host memory, else forward or
    reverse mode as ``score.mode`` says."""
    s = ctx.config.score
    model = (ctx.task.per_example_loss, ctx.param_sh, ctx.vector_sh, ctx.mesh, ctx.selection)
    sizing = {
        "batch_size": s.batch_size,
        "memory_budget_mb": s.memory_budget_mb,
        "tangent_chunk": s.tangent_chunk,
        "sqnorm": rows.sigma is not None,
    }
    if where == "host":
        if s.mode == "auto":
            logging.info("score.mode=auto: forward (the tangents are in host memory)")
        return streamed_products.StreamedProgram(*model, **sizing)
    if operator is not None:
        return operator_products.OperatorProgram(
            ctx.task.per_example_loss,
            ctx.param_sh,
            ctx.mesh,
            ctx.selection,
            operator.solve if rows.self_influence else None,
            batch_size=s.batch_size,
            num_steps=num_steps,
            name=ctx.method.name,
        )
    return products.Program(*model, mode=s.mode, **sizing)
