"""Passes over the data that several methods make: HVPs on blocks of vectors (LiSSA, CG, exact)
and data-parallel statistics of per-example gradients (HyperINF's GFIM, DataInf, EK-FAC's
corrected eigenvalues) or of dense layers' inputs and output gradients (EK-FAC's factors).

Every pass reads its batches with ``tasks/batching.py`` (each process its own rows) and runs one
jitted, sharded program per batch from a Python loop (a conv HVP inside ``lax`` loops runs ~15×
slower on the CPU; README, Speed).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from influence import factorised
from influence.hvp import make_hvp
from methods.base import Context
from parallel import programs, sharding
from parallel.mesh import DATA_AXIS
from runtime.errors import InputError
from tasks import batching


def full_batches(
    num_examples: int, batch_size: int, data_devices: int, field: str = "method.name=exact"
) -> list[np.ndarray]:
    """The training split in equal batches of the largest size ≤ ``batch_size`` that divides it
    and the 'data' axis, so the mean of the batch means is the mean over the split."""
    sizes = [
        r
        for r in range(min(batch_size, num_examples), 0, -1)
        if num_examples % r == 0 and r % data_devices == 0
    ]
    if not sizes:
        raise InputError(
            f"{field}: the {num_examples} training examples cannot be split into equal batches "
            f"that divide the {data_devices} devices on the 'data' axis; change mesh.data or "
            "data.num_train"
        )
    r = sizes[0]
    return [np.arange(s, s + r) for s in range(0, num_examples, r)]


def jit_block_hvp(ctx: Context) -> Callable[[Any, dict, Any], Any]:
    """(params, batch, V) → H V for the k stacked rows of V at once (a vmap of the
    forward-over-reverse HVP, + l2 V), V and the result laid out like the eigenvectors."""
    hvp = make_hvp(ctx.task.per_example_loss, ctx.config.l2, ctx.selection)
    stacked = sharding.stacked_shardings(ctx.vector_sh)
    return jax.jit(
        lambda params, batch, v: jax.vmap(lambda row: hvp(params, batch, row))(v),
        in_shardings=(ctx.param_sh, sharding.batch_sharding(ctx.mesh), stacked),
        out_shardings=stacked,
    )


class FullHessian:
    """v ↦ H v with H the Hessian of the mean loss over the whole training split (+ l2 I), the
    same matrix ``method.name=exact`` forms: the mean of block HVPs over equal batches of at most
    ``method.hvp_batch_size`` examples. The batches stay on the devices when the split's inputs
    take at most ``RESIDENT_BYTES``; else each product reads them again."""

    RESIDENT_BYTES = 512 * 2**20

    def __init__(self, ctx: Context, params: Any) -> None:
        self._ctx, self._params, self._hvp = ctx, params, jit_block_hvp(ctx)
        self._positions = full_batches(
            ctx.split("train").num_examples,
            ctx.config.method.hvp_batch_size,
            ctx.mesh.shape[DATA_AXIS],
            f"method.name={ctx.method.name}",
        )
        first = self._read(self._positions[0])
        size = sum(x.nbytes for x in jax.tree.leaves(first)) * len(self._positions)
        self._resident = (
            [first, *map(self._read, self._positions[1:])] if size <= self.RESIDENT_BYTES else None
        )
        self.num_batches = len(self._positions)

    def _read(self, positions: np.ndarray) -> dict:
        ctx = self._ctx
        return ctx.batch("train", positions)

    def __call__(self, v: Any) -> Any:
        total = None
        batches = self._resident or map(self._read, self._positions)
        for batch in batches:
            part = self._hvp(self._params, batch, v)
            total = part if total is None else jax.tree.map(jnp.add, total, part)
        return jax.tree.map(lambda x: x / self.num_batches, total)


def gradient_statistics(
    ctx: Context,
    params: Any,
    reduce: Callable[[Any, jax.Array], Any],
    name: str,
    batch_size: int,
    split: str = "train",
    num_examples: int | None = None,
    operands: Any = None,
) -> tuple[Any, int]:
    """(Σ over every example of ``split`` of ``reduce(per-example gradients, mask)``, N): one
    data-parallel pass over the split (its first ``num_examples``, if given) in padded batches of
    ``batch_size``; ``reduce`` gets a device's rows (stacked gradients over the selected leaves)
    and their 0/1 mask (and ``operands``, replicated, when given: arrays the statistics need,
    passed to the program as arguments) and returns per-row-summed statistics, added up over the
    devices by one all-reduce per leaf."""
    program = programs.jit_example_rows(
        ctx.task.per_example_loss, ctx.param_sh, ctx.mesh, ctx.selection, _with(reduce, operands)
    )
    return _statistics_pass(ctx, params, program, operands, name, batch_size, split, num_examples)


def layer_statistics(
    ctx: Context,
    params: Any,
    reduce: Callable[[list[factorised.Record], jax.Array], Any],
    name: str,
    batch_size: int,
    split: str = "train",
    num_examples: int | None = None,
    operands: Any = None,
) -> tuple[Any, int]:
    """``gradient_statistics`` of the selected dense layers' inputs and output gradients
    (``influence.factorised.Record``s) instead of per-example gradients: K-FAC's factors."""
    program = programs.jit_layer_sums(
        ctx.task.per_example_loss, ctx.param_sh, ctx.mesh, ctx.selection, _with(reduce, operands)
    )
    return _statistics_pass(ctx, params, program, operands, name, batch_size, split, num_examples)


def _with(reduce: Callable[..., Any], operands: Any) -> Callable[[Any, jax.Array, Any], Any]:
    """The programs' (rows, mask, operands) reduce of a ``reduce`` that takes operands only when
    there are some."""
    return reduce if operands is not None else lambda rows, mask, _: reduce(rows, mask)


def _statistics_pass(
    ctx: Context,
    params: Any,
    program: Callable[[Any, dict, jax.Array, Any], Any],
    operands: Any,
    name: str,
    batch_size: int,
    split: str,
    num_examples: int | None,
) -> tuple[Any, int]:
    """The sum of ``program(params, batch, mask, operands)`` over the first ``num_examples`` (default: all)
    of ``split`` in padded global batches, each process reading its own rows."""
    source = ctx.split(split)
    count = source.num_examples if num_examples is None else min(num_examples, source.num_examples)
    batches = list(batching.padded_batches(0, count, batch_size))
    total = None
    with ctx.progress(name, len(batches)) as progress:
        for step, (positions, mask) in enumerate(batches, start=1):
            rows = sharding.local_rows(ctx.mesh, batch_size)
            columns = ctx.task.model_inputs(source.take(positions[rows]))
            batch = sharding.to_global(columns, ctx.mesh, batch_size)
            weights = sharding.to_global(
                {"mask": mask[rows].astype(np.float32)}, ctx.mesh, batch_size
            )
            sums = program(params, batch, weights["mask"], operands)
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
            progress(step)
    return total, count
