"""EK-FAC (George et al. 2018; the influence preconditioner of Grosse et al. 2023 and of the
PyTorch library kronfluence): per selected dense layer, K-FAC's Kronecker eigenbasis Q_A ⊗ Q_S
with the eigenvalues refitted to the per-example gradients (``influence/ekfac.py``),

    P G = Q_A ((Q_Aᵀ G Q_S) / (Λ + λ)) Q_Sᵀ,   Λ = E[(Q_Aᵀ G_n Q_S)²],
    λ = method.damping_ratio · mean(Λ) + l2.

The fit is two data-parallel passes over the training split (its first ``method.max_examples``,
kronfluence's 100,000), each one program per batch with per-device sums and one all-reduce per
statistic (``methods/passes.py``):

1. the factors A = E[a aᵀ] of each layer's inputs and S = E[δ δᵀ] of its output gradients, from
   the factorised interceptor's records (``influence.factorised.make_layer_records``: one vmapped
   backward pass, no per-example gradient), each over every position of every example (a
   sequence model's tokens) and divided by their count, as kronfluence does (the scale of A and
   S does not change P: only their eigenvectors are used); their eigenbases by float64 ``eigh``
   on the host;
2. the corrected eigenvalues Λ from the per-example gradients (the score job's own) rotated into
   those bases, with Q_A and Q_S passed to the program as arguments.

A layer's bias, when selected, is one more input column of 1s (kronfluence's choice): kernel and
bias form one (in + 1) × out gradient preconditioned together, A is (in + 1) × (in + 1). The
damping is kronfluence's heuristic (``damping_factor=None``: 0.1 · mean(Λ); its default is a
constant 1e-8) plus the run's l2 (l2·I is l2 on every eigenvalue); ``method.damping``, the
constant of hyperinf and datainf, is not read. The statistics are the empirical Fisher (the
training labels: kronfluence's ``use_empirical_fisher=True``), and padded positions of a sequence
count in A (kronfluence masks them when given an attention mask).

Only ``flax.linen.Dense`` layers are modelled: a selected leaf that is not a 2-D ``kernel`` or
the 1-D ``bias`` beside a selected one, a selection without any, or a factor wider than
``method.max_layer_params`` is a one-line error before any work (``check_size``); a 2-D kernel
that turns out not to be an ``nn.Dense``'s is one when the fit first traces the model. The
fitted state (Q_A, Q_S, their eigenvalues, Λ and λ per layer, replicated) is saved with the
method's fingerprint and restored by the score stage.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from influence import ekfac
from influence.factorised import Record
from methods import checks, dense_layers, passes
from methods.base import Context, Kind, Method, empty_fitted
from methods.dense_layers import Layer
from parallel import sharding
from runtime import finite
from runtime.config import Block
from runtime.errors import InputError

STATE = (  # the saved state's entries, each a tree of per-layer arrays keyed like the kernels
    "activation_eigenvectors",  # Q_A (fan_in, fan_in)
    "gradient_eigenvectors",  # Q_S (fan_out, fan_out)
    "activation_eigenvalues",  # eig(A) (fan_in,): K-FAC's, for diagnostics
    "gradient_eigenvalues",  # eig(S) (fan_out,)
    "eigenvalues",  # Λ (fan_in, fan_out), undamped
    "damping",  # λ ()
)


def check_size(config: ml_collections.ConfigDict, selected: Any) -> None:
    """Dense layers only (``methods.dense_layers.layers``), none with a factor wider than
    ``method.max_layer_params`` (A and S are formed, decomposed and kept replicated): a
    ``check_size``, so every stage's set-up runs it, before any params are trained."""
    name, limit = config.method.name, config.method.max_layer_params
    for layer in dense_layers.layers(selected, name):
        side = max(layer.fan_in, layer.fan_out)
        if side > limit:
            raise InputError(
                f"method.name={name}: layer {layer.kernel} needs a {side} × {side} factor, more "
                f"than method.max_layer_params={limit}; select fewer layers (config.params) or "
                "raise it"
            )


def _factor_sums(layout: list[Layer]) -> Any:
    """The first pass's reduce: per layer (Σ a aᵀ, Σ δ δᵀ, positions) over a device's rows, every
    call of the layer's kernel pooled (a layer applied twice, as a tied weight)."""

    def reduce(records: list[Record], mask: jax.Array) -> list[tuple[jax.Array, ...]]:
        by_call: dict[str, list[Record]] = {}
        for record in records:
            by_call.setdefault(record.kernel, []).append(record)
        sums = []
        for layer in layout:
            calls = by_call.get(layer.kernel, [])
            if not calls or not all(r.dense for r in calls):
                raise InputError(
                    f"method.name=ekfac: {layer.kernel} is not the kernel of a flax.linen.Dense "
                    "layer it can factor (an nn.Dense without a dot_general override, "
                    f"influence/factorised.py): {dense_layers.FIX}"
                )
            x = jnp.concatenate([r.inputs for r in calls], axis=1)
            d = jnp.concatenate([r.deltas for r in calls], axis=1)
            sums.append(ekfac.factor_sums(ekfac.with_ones(x) if layer.bias else x, d, mask))
        return sums

    return reduce


def _eigenvalue_sums(layout: list[Layer]) -> Any:
    """The second pass's reduce: per layer Σ_n m_n (Q_Aᵀ G_n Q_S)² over a device's rows."""

    def reduce(grads: Any, mask: jax.Array, bases: list) -> list[jax.Array]:
        flat = dense_layers.by_path(grads)
        return [
            ekfac.eigenvalue_sums(dense_layers.layer_grads(flat, layer), mask, q_in, q_out)
            for layer, (q_in, q_out) in zip(layout, bases, strict=True)
        ]

    return reduce


def _host(array: jax.Array, what: str) -> np.ndarray:
    value = sharding.replicated_to_host(array).astype(np.float64)
    if not np.all(np.isfinite(value)):
        raise finite.NonFiniteError(
            f"ekfac: {what} is not finite; check the trained params and the data for non-finite "
            "values"
        )
    return value


def eigenbases(ctx: Context, params: Any, layout: list[Layer]) -> list[tuple[np.ndarray, ...]]:
    """Pass 1: per layer (Q_A, Q_S, eig(A), eig(S)) in float64, A and S the means over every
    position of the first ``method.max_examples`` training examples."""
    m = ctx.config.method
    sums, _ = passes.layer_statistics(
        ctx,
        params,
        _factor_sums(layout),
        "ekfac factors",
        ctx.config.score.batch_size,
        num_examples=m.max_examples,
    )
    found = []
    for layer, (a, s, positions) in zip(layout, sums, strict=True):
        positions = float(positions)
        a_vals, q_in = ekfac.eigenbasis(_host(a, f"A of {layer.kernel}") / positions)
        s_vals, q_out = ekfac.eigenbasis(_host(s, f"S of {layer.kernel}") / positions)
        found.append((q_in, q_out, a_vals, s_vals))
    return found


def corrected_eigenvalues(
    ctx: Context, params: Any, layout: list[Layer], bases: list[tuple[np.ndarray, ...]]
) -> tuple[list[np.ndarray], int]:
    """Pass 2: per layer Λ = (1/N) Σ_n (Q_Aᵀ G_n Q_S)² (float64), and N."""
    operands = jax.device_put(
        [(b[0].astype(np.float32), b[1].astype(np.float32)) for b in bases],
        sharding.replicated(ctx.mesh),
    )
    sums, count = passes.gradient_statistics(
        ctx,
        params,
        _eigenvalue_sums(layout),
        "ekfac eigenvalues",
        ctx.config.score.batch_size,
        num_examples=ctx.config.method.max_examples,
        operands=operands,
    )
    return [_host(s, f"Λ of {x.kernel}") / count for x, s in zip(layout, sums, strict=True)], count


def fit(ctx: Context, params: Any) -> Any:
    config, m = ctx.config, ctx.config.method
    layout = dense_layers.layers(ctx.vectors_like, m.name)
    bases = eigenbases(ctx, params, layout)
    eigenvalues, count = corrected_eigenvalues(ctx, params, layout, bases)
    dampings, summary = [], []
    for layer, lam in zip(layout, eigenvalues, strict=True):
        damping = ekfac.damping(lam, m.damping_ratio, config.l2)
        if not damping > 0:
            raise InputError(
                f"method.name=ekfac: every gradient of {layer.kernel} is zero on the training "
                "split and l2=0, so nothing damps it; deselect it (config.params) or set l2 > 0"
            )
        dampings.append(np.float32(damping))
        summary.append(
            {
                **dataclasses.asdict(layer),
                "damping": damping,
                "mean_eigenvalue": float(lam.mean()),
                "max_eigenvalue": float(lam.max()),
            }
        )
    logging.info(
        "ekfac: %d dense layers over %d examples, λ in [%.3e, %.3e]",
        len(layout),
        count,
        min(dampings),
        max(dampings),
    )
    values = [*([v.astype(np.float32) for v in c] for c in zip(*bases, strict=True))]
    values += [[x.astype(np.float32) for x in eigenvalues], dampings]
    repl = sharding.replicated(ctx.mesh)
    state = {
        k: jax.device_put(dense_layers.by_kernel(layout, v), repl)
        for k, v in zip(STATE, values, strict=True)
    }
    return empty_fitted(ctx.vectors_like, {"num_examples": count, "layers": summary}, state)


def operator_like(ctx: Context) -> Any:
    """The saved state's restore target: ``STATE``'s arrays per layer, float32, replicated."""
    layout, repl = (
        dense_layers.layers(ctx.vectors_like, ctx.method.name),
        sharding.replicated(ctx.mesh),
    )
    shapes = {
        "activation_eigenvectors": lambda x: (x.fan_in, x.fan_in),
        "gradient_eigenvectors": lambda x: (x.fan_out, x.fan_out),
        "activation_eigenvalues": lambda x: (x.fan_in,),
        "gradient_eigenvalues": lambda x: (x.fan_out,),
        "eigenvalues": lambda x: (x.fan_in, x.fan_out),
        "damping": lambda x: (),
    }
    return {
        k: dense_layers.by_kernel(
            layout, [jax.ShapeDtypeStruct(shapes[k](x), jnp.float32, sharding=repl) for x in layout]
        )
        for k in STATE
    }


class Eigenbasis:
    """The ``Operator``: each stacked vector's layers preconditioned in their eigenbasis,
    P G = Q_A ((Q_Aᵀ G Q_S) / (Λ + λ)) Q_Sᵀ, kernel and bias together."""

    def __init__(self, ctx: Context, state: dict[str, Any]) -> None:
        layout = dense_layers.layers(ctx.vectors_like, ctx.method.name)
        q_in, q_out, lam, damping = (
            dense_layers.per_layer(layout, state[k])
            for k in ("activation_eigenvectors", "gradient_eigenvectors", "eigenvalues", "damping")
        )
        self._factors = [
            (a, s, e + d) for a, s, e, d in zip(q_in, q_out, lam, damping, strict=True)
        ]

        def solve(vectors: Any, factors: list) -> Any:
            flat, out = dense_layers.by_path(vectors), {}
            for layer, (a, s, scale) in zip(layout, factors, strict=True):
                g = dense_layers.layer_grads(flat, layer).astype(jnp.float32)
                out.update(dense_layers.split_grads(ekfac.precondition(g, a, s, scale), layer))
            leaves = [out[p].astype(v.dtype) for p, v in flat.items()]
            return jax.tree.unflatten(jax.tree.structure(vectors), leaves)

        self._solve = jax.jit(solve)

    def solve(self, vectors: Any) -> Any:
        return self._solve(vectors, self._factors)


def _check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    checks.full_products(config, mesh)
    m = config.method
    if not m.damping_ratio >= 0:
        raise InputError(f"method.damping_ratio={m.damping_ratio} must be >= 0")
    if m.max_layer_params < 1 or m.max_examples < 1:
        raise InputError(
            f"method.max_layer_params={m.max_layer_params} and method.max_examples="
            f"{m.max_examples} must be positive"
        )


EKFAC = Method(
    name="ekfac",
    equation="P = Q_A ((Q_Aᵀ G Q_S) / (Λ + λ)) Q_Sᵀ per Dense layer, Λ = E[(Q_Aᵀ G_n Q_S)²]",
    kind=Kind.OPERATOR,
    config=(
        Block(
            "method",
            {
                "damping_ratio": 0.1,  # λ = damping_ratio · mean(Λ) + l2 (kronfluence's 0.1)
                "max_layer_params": 16_384,  # the widest factor side (in + 1 or out)
                "max_examples": 100_000,  # examples of both passes (kronfluence's default)
            },
        ),
    ),
    fingerprint=("method.damping_ratio", "method.max_examples"),
    fit=fit,
    check=_check,
    operator=lambda ctx, params, state: Eigenbasis(ctx, state),
    operator_like=operator_like,
    check_size=check_size,
)
