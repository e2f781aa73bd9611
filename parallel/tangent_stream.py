"""The score job's tangents in host memory, moved to the devices a chunk at a time
(``score.eigvecs_storage=host``; issue 27, item 3: G of a 1B–8B model, p̃ × p floats, does not
fit in HBM beside the model).

The tangents are every row the products program projects an example onto (``scoring/tangents``):
G's p̃ eigenvectors, then the query gradients, then v̄. ``HostTangents`` keeps them as chunks of
``width`` rows (the last padded with zero rows), each a stacked pytree of JAX arrays in the host
memory kind (``pinned_host`` where the devices have it), laid out over the devices as they would
be on them: each process holds only its own shards. A chunk moves with ``jax.device_put``, the
transfer of chunk c + 1 overlapping the JVPs along chunk c (``offload.stream``).

The chunks are cut on the host, shard by shard (numpy slices of each device's part, placed with
``device_put`` on that device's host memory): nothing is computed on arrays in host memory, which
backends support unevenly, and the devices never hold more than two chunks. While they are cut
the host holds the tangents twice (the pieces and the chunks), one leaf at a time for the chunks.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parallel import offload
from parallel.sharding import stacked_shardings


def host_kind() -> str:
    """The host memory kind the tangents live in; a one-line reason where there is none."""
    kind = offload.host_memory_kind()
    if kind is None:
        raise ValueError(
            "the devices have no host memory kind to keep the eigenvectors in; set "
            "score.eigvecs_storage=device"
        )
    return kind


class HostTangents:
    """``num_rows`` tangents in host memory as chunks of ``width`` rows."""

    def __init__(self, pieces: list[Any], width: int, vector_sh: Any) -> None:
        """``pieces``: stacked pytrees (on the devices or in host memory) laid out by
        ``vector_sh``, their rows in order; cut into chunks of ``width`` rows."""
        self.num_rows = sum(jax.tree.leaves(p)[0].shape[0] for p in pieces)
        self.width = max(1, min(width, self.num_rows))
        self.num_chunks = max(1, math.ceil(self.num_rows / self.width))
        self.device_sh = stacked_shardings(vector_sh)
        self.host_sh = offload.with_kind(self.device_sh, host_kind())
        leaves = [jax.tree.leaves(p) for p in pieces]
        treedef = jax.tree.structure(pieces[0])
        cut = [
            self._cut([piece[i] for piece in leaves], sh)
            for i, sh in enumerate(jax.tree.leaves(self.host_sh))
        ]
        self.chunks = [
            jax.tree.unflatten(treedef, [leaf[c] for leaf in cut]) for c in range(self.num_chunks)
        ]

    def _cut(self, parts: list[jax.Array], host_sh: Any) -> list[jax.Array]:
        """One leaf's rows (``parts`` in order) → its chunks, each a global array in host memory
        assembled from every local device's part."""
        shape = (self.width, *parts[0].shape[1:])
        per_device = {}
        for shard in parts[0].addressable_shards:
            data = offload.local_rows(parts, shard.device)
            pad = self.num_chunks * self.width - data.shape[0]
            if pad:
                data = np.concatenate([data, np.zeros((pad, *data.shape[1:]), data.dtype)])
            per_device[shard.device] = data
        w = self.width
        return [
            offload.place(
                {d: x[c * w : (c + 1) * w] for d, x in per_device.items()}, shape, host_sh
            )
            for c in range(self.num_chunks)
        ]

    def fetch(self, c: int) -> Callable[[], Any]:
        """Start moving chunk c to the devices; the getter returns it there."""
        chunk = jax.device_put(self.chunks[c], self.device_sh)
        return lambda: chunk

    def set_row(self, row: int, value: Any) -> None:
        """Row ``row`` ← ``value`` (a stacked pytree of one row on the devices): its chunk makes
        one round trip through the devices."""
        c, i = divmod(row, self.width)
        updated = jax.jit(
            lambda chunk, v: jax.tree.map(lambda x, y: x.at[i].set(y[0].astype(x.dtype)), chunk, v),
            out_shardings=self.device_sh,
        )(self.fetch(c)(), value)
        self.chunks[c] = jax.device_put(updated, self.host_sh)

    def stream(self, use: Callable[[int, Any], Any]) -> None:
        """``use(c, chunk c on the devices)`` for every chunk, double buffered."""
        offload.stream(self.fetch, list(range(self.num_chunks)), use)


def apply_inverse(
    tangents: HostTangents, num_eig: int, eigvals: np.ndarray, v: Any, sigma: float | None
) -> Any:
    """P v = Gᵀ diag(1/λ) G v (+ (v − GᵀG v)/σ with the tail) with G the first ``num_eig`` rows of
    ``tangents``, streamed twice (``influence.scoring.apply_inverse`` with G on the devices):
    once for the coordinates G v, once to accumulate the two sums over G's rows."""
    flat = lambda x: x.reshape(x.shape[0], -1)  # noqa: E731
    dots = jax.jit(
        lambda chunk, v: sum(
            jnp.tensordot(flat(y), flat(x), axes=(1, 1), preferred_element_type=jnp.float32)
            for x, y in zip(jax.tree.leaves(chunk), jax.tree.leaves(v), strict=True)
        )
    )
    coords: list[jax.Array] = []

    def project(c: int, chunk: Any) -> jax.Array:
        coords.append(dots(chunk, v))
        return coords[-1]

    tangents.stream(project)
    padded = jnp.concatenate(coords, axis=1)
    real = np.arange(padded.shape[1]) < num_eig
    inverse = np.zeros(padded.shape[1], np.float32)
    inverse[:num_eig] = 1.0 / np.asarray(eigvals, np.float32)
    weights = jnp.where(real, padded, 0.0)
    like_v = jax.tree.map(lambda x: x.sharding, v)
    add = lambda s, w, chunk: jax.tree.map(  # noqa: E731
        lambda s, x: s + jnp.tensordot(w, x.astype(jnp.float32), axes=(1, 0)), s, chunk
    )
    accumulate = jax.jit(
        lambda sums, chunk, w_out, w_in: (add(sums[0], w_out, chunk), add(sums[1], w_in, chunk)),
        out_shardings=(like_v, like_v),
        donate_argnums=0,
    )
    zeros = lambda v: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), v)  # noqa: E731
    sums = [jax.jit(lambda v: (zeros(v), zeros(v)), out_shardings=(like_v, like_v))(v)]
    width = tangents.width

    def use(c: int, chunk: Any) -> Any:
        part = weights[:, c * width : (c + 1) * width]
        sums[0] = accumulate(sums[0], chunk, part * inverse[c * width : (c + 1) * width], part)
        return sums[0]

    tangents.stream(use)

    def leaf(out: jax.Array, inside: jax.Array, x: jax.Array) -> jax.Array:
        if sigma is not None:
            out = out + (x - inside) / sigma
        return out.astype(x.dtype)

    return jax.jit(lambda s, v: jax.tree.map(leaf, s[0], s[1], v), out_shardings=like_v)(sums[0], v)
