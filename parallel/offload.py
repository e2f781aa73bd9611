"""Krylov basis rows kept off the devices: in host memory or on disk, moved to the devices a block
at a time (``arnoldi.basis_storage``; issue: the basis of a 1B–8B model does not fit in HBM).

A store holds ``num_blocks × block_rows`` rows (the last block padded with zero rows), each row a
vector laid out like the (selected) params. Every process holds only its own shards, as the
devices would: a leaf split over 'model' is split the same way in host memory or on disk.

- ``HostStore``: each block is a stacked pytree of JAX arrays in host memory (the ``pinned_host``
  memory kind, which DMA engines read without a staging copy; ``unpinned_host`` where a backend
  has only that). The first ``device_blocks`` blocks may stay in device memory (``auto``): they
  are read in place.
- ``DiskStore``: one tensorstore zarr3 array per leaf and shard, a chunk per row, under a
  directory of the workdir. Reads run on tensorstore's threads, so a block read is issued a
  block ahead of its use (``fetch`` returns at once; the getter waits).

``fetch(j)`` starts moving block j to the devices and returns a getter for it: the caller asks for
block j + 1 once block j's compute is dispatched, so each transfer overlaps the previous block's
compute (double buffering; ``stream``).
"""

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from influence import pytree
from parallel.sharding import bytes_per_device, stacked_shardings

Getter = Callable[[], Any]
DEVICE = "device"


def host_memory_kind() -> str | None:
    """``pinned_host`` where the devices have it, else ``unpinned_host``, else None."""
    kinds = {m.kind for m in jax.local_devices()[0].addressable_memories()}
    return next((k for k in ("pinned_host", "unpinned_host") if k in kinds), None)


def dtype_unsupported(dtype: str) -> str | None:
    """Why the devices cannot store a basis in ``dtype`` (None: they can): a row written into
    a stacked array of it and a float32-accumulated dot product, compiled and run once."""
    try:
        basis = jnp.zeros((2, 8), dtype)
        basis = jax.jit(lambda b, v: b.at[1].set(v.astype(b.dtype)))(basis, jnp.ones(8))
        dot = jax.jit(lambda b: jnp.dot(b, b[1], preferred_element_type=jnp.float32))(basis)
        if float(dot[1]) != 8.0:
            return f"a {dtype} dot product gave {float(dot[1])}, not 8"
    except Exception as e:  # XLA raises many types for an unsupported type
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def stream(fetch: Callable[[int], Getter], keys: list[int], use: Callable[[int, Any], Any]) -> None:
    """``use(j, fetch(j)())`` for each of ``keys`` in order, double buffered: while item n's
    compute runs, item n + 1's transfer runs, started once item n − 1's compute (what ``use``
    returned) has finished. So at most two items are on the devices: JAX dispatches
    asynchronously, and without the wait the host would queue the transfers of a whole sweep
    ahead of the compute (measured: the resident memory of a disk run grew by a row per
    iteration). The Krylov basis' blocks (``parallel/krylov_storage.py``) and the score job's
    tangent chunks (``parallel/tangent_stream.py``) stream through it."""
    pending = fetch(keys[0])
    previous = None
    for n, j in enumerate(keys):
        item = pending()
        if previous is not None:  # before ``use`` may donate it
            jax.block_until_ready(previous)
        previous = use(j, item)
        if n + 1 < len(keys):
            pending = fetch(keys[n + 1])


def local_rows(parts: list[jax.Array], device: jax.Device) -> np.ndarray:
    """The rows of stacked arrays ``parts`` (one leaf, rows in order) that ``device`` holds, as
    one numpy array: a host-side copy, whatever memory the parts are in."""
    rows = []
    for part in parts:
        (shard,) = (s for s in part.addressable_shards if s.device == device)
        rows.append(np.asarray(shard.data))
    return np.concatenate(rows) if len(rows) > 1 else rows[0]


def place(per_device: dict[jax.Device, np.ndarray], shape: tuple, sharding: Any) -> jax.Array:
    """One global array of ``shape`` laid out by ``sharding`` (its memory kind included) from
    each local device's part: ``device_put`` of numpy only, so nothing is computed on arrays in
    host memory (which backends support unevenly)."""
    kind = sharding.memory_kind
    arrays = [
        jax.device_put(data, jax.sharding.SingleDeviceSharding(device, memory_kind=kind))
        for device, data in per_device.items()
    ]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def concat_rows(pieces: list[Any], shardings: Any) -> Any:
    """Stacked pytrees → their rows in one stacked pytree laid out by ``shardings`` (e.g. in host
    memory), assembled on the host a leaf at a time."""
    leaves = [jax.tree.leaves(p) for p in pieces]
    out = []
    for i, sh in enumerate(jax.tree.leaves(shardings)):
        parts = [piece[i] for piece in leaves]
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        devices = [s.device for s in parts[0].addressable_shards]
        out.append(place({d: local_rows(parts, d) for d in devices}, shape, sh))
    return jax.tree.unflatten(jax.tree.structure(pieces[0]), out)


def with_kind(shardings: Any, kind: str) -> Any:
    return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings)


class HostStore:
    """Blocks of rows as JAX arrays in host memory (the first ``device_blocks`` on the devices)."""

    def __init__(
        self, like: Any, num_rows: int, block_rows: int, vector_sh: Any, device_blocks: int = 0
    ) -> None:
        kind = host_memory_kind()
        if kind is None:
            raise ValueError("the devices have no host memory kind to keep the basis in")
        self.block_rows = block_rows
        self.num_blocks = math.ceil(num_rows / block_rows)
        self.device_sh = stacked_shardings(vector_sh)
        self.kinds = [DEVICE if j < device_blocks else kind for j in range(self.num_blocks)]
        zeros = lambda: pytree.stacked_zeros(like, block_rows)  # noqa: E731
        self.blocks = [
            jax.jit(zeros, out_shardings=with_kind(self.device_sh, kind))() for kind in self.kinds
        ]
        self._write = {k: _row_writer(k, with_kind(self.device_sh, k)) for k in set(self.kinds)}

    def write_row(self, row: int, vector: Any) -> None:
        j, i = divmod(row, self.block_rows)
        self.blocks[j] = self._write[self.kinds[j]](self.blocks[j], vector, i)

    def fetch(self, j: int) -> Getter:
        block = self.blocks[j]
        if self.kinds[j] != DEVICE:
            block = jax.device_put(block, self.device_sh)  # asynchronous: a DMA
        return lambda: block

    def bytes_per_device(self) -> tuple[int, int]:
        """(bytes in device memory, bytes in host memory) of the most loaded device's shards."""
        on = [b for b, k in zip(self.blocks, self.kinds, strict=True) if k == DEVICE]
        off = [b for b, k in zip(self.blocks, self.kinds, strict=True) if k != DEVICE]
        return bytes_per_device(on), bytes_per_device(off)

    def close(self) -> None:
        self.blocks = []


def _row_writer(kind: str, block_sh: Any) -> Callable[[Any, Any, int], Any]:
    """(block, vector, i) → the block with row i set to the vector (donated, kept in ``kind``)."""

    def write(block: Any, vector: Any, i: jax.Array) -> Any:
        def leaf(b: jax.Array, v: jax.Array) -> jax.Array:
            v = v.astype(b.dtype)[None]
            if kind != DEVICE:
                v = jax.device_put(v, jax.memory.Space.Host)
            return jax.lax.dynamic_update_slice_in_dim(b, v, i, 0)

        return jax.tree.map(leaf, block, vector)

    return jax.jit(write, donate_argnums=0, out_shardings=block_sh)


class DiskStore:
    """Rows in tensorstore zarr3 arrays under ``directory``: one per leaf and distinct shard this
    process holds, shape (rows, *shard), one chunk per row (a row is written once)."""

    def __init__(
        self, directory: Path, like: Any, num_rows: int, block_rows: int, vector_sh: Any
    ) -> None:
        self.directory = Path(directory) / f"process_{jax.process_index()}"
        shutil.rmtree(self.directory, ignore_errors=True)  # scratch: rebuilt from the pieces
        self.block_rows = block_rows
        self.num_blocks = math.ceil(num_rows / block_rows)
        self.device_sh, self.vector_sh = stacked_shardings(vector_sh), vector_sh
        self.like, self.treedef = jax.tree.flatten(like)
        self.shards: list[dict[tuple, list[jax.Device]]] = []  # per leaf: index → its devices
        self.arrays: list[dict[tuple, Any]] = []
        rows = self.num_blocks * block_rows
        for n, (leaf, sh) in enumerate(zip(self.like, jax.tree.leaves(vector_sh), strict=True)):
            index_map = sh.addressable_devices_indices_map(leaf.shape)
            groups: dict[tuple, list[jax.Device]] = {}
            for device, index in index_map.items():
                groups.setdefault(_key(index, leaf.shape), []).append(device)
            self.shards.append(groups)
            self.arrays.append(
                {
                    key: _open(self.directory / f"leaf{n}_{i}", rows, key, leaf.dtype)
                    for i, key in enumerate(groups)
                }
            )
        self.pending: list[Any] = []

    def write_row(self, row: int, vector: Any) -> None:
        """Start writing row ``row`` (the writes finish before any later read)."""
        for leaf, arrays in zip(jax.tree.leaves(vector), self.arrays, strict=True):
            done: set[tuple] = set()
            for shard in leaf.addressable_shards:
                key = _key(shard.index, leaf.shape)
                if key not in done:
                    done.add(key)
                    data = np.asarray(shard.data).astype(arrays[key].dtype.numpy_dtype, copy=False)
                    self.pending.append(arrays[key][row].write(data))

    def flush(self) -> None:
        for future in self.pending:
            future.result()
        self.pending = []

    def fetch(self, j: int) -> Getter:
        self.flush()
        rows = slice(j * self.block_rows, (j + 1) * self.block_rows)
        reads = [{key: a[rows].read() for key, a in arrays.items()} for arrays in self.arrays]
        return lambda: self._assemble(reads)

    def _assemble(self, reads: list[dict[tuple, Any]]) -> Any:
        leaves = []
        for leaf, groups, futures, sh in zip(
            self.like, self.shards, reads, jax.tree.leaves(self.device_sh), strict=True
        ):
            shape = (self.block_rows, *leaf.shape)
            parts = [
                jax.device_put(futures[key].result(), device)
                for key, devices in groups.items()
                for device in devices
            ]
            leaves.append(jax.make_array_from_single_device_arrays(shape, sh, parts))
        return jax.tree.unflatten(self.treedef, leaves)

    def bytes_per_device(self) -> tuple[int, int]:
        """(0, bytes on disk for this process)."""
        like = jax.tree.unflatten(self.treedef, self.like)
        return 0, self.num_blocks * self.block_rows * row_bytes(like, self.vector_sh)[1]

    def close(self) -> None:
        self.flush()
        shutil.rmtree(self.directory, ignore_errors=True)


def row_bytes(like: Any, vector_sh: Any) -> tuple[int, int]:
    """(bytes of one row on a device, bytes of one row this process holds: each distinct shard
    of its devices once, as a store keeps it)."""
    device = process = 0
    for leaf, sh in zip(jax.tree.leaves(like), jax.tree.leaves(vector_sh), strict=True):
        item = np.dtype(leaf.dtype).itemsize
        device += math.prod(sh.shard_shape(leaf.shape)) * item
        keys = {
            _key(i, leaf.shape) for i in sh.addressable_devices_indices_map(leaf.shape).values()
        }
        process += sum(math.prod(_shape(key)) for key in keys) * item
    return device, process


def _key(index: tuple, shape: tuple[int, ...]) -> tuple:
    """A shard's index as hashable (start, stop) pairs."""
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _shape(key: tuple) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in key)


def _open(path: Path, rows: int, key: tuple, dtype: Any) -> Any:
    shape = (rows, *_shape(key))
    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": list(shape),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, *shape[1:]]}},
            "data_type": np.dtype(dtype).name,
        },
    }
    return ts.open(spec, create=True, delete_existing=True).result()
