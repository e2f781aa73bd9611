"""Sharding rules: where params, Krylov vectors and batches live on the mesh.

- Params: replicated, except leaves with at least ``min_shard_size`` elements, which are split over
  'model' along their largest dimension divisible by the 'model' axis size.
- Stacked trees (Krylov basis (n + 1, …), eigenvectors (p̃, …)): the stacking axis is replicated,
  the rest follows the param leaf, so memory per device for a large leaf is
  (n + 1) · leaf.size · 4 B / |model|, and ⟨q_j, w⟩ is a reduction over 'model'.
- Batches: the example axis over 'data'.
"""

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from parallel.mesh import DATA_AXIS, MODEL_AXIS, MeshError


def leaf_spec(shape: tuple[int, ...], model_size: int, min_shard_size: int) -> P:
    size = int(np.prod(shape)) if shape else 1
    if model_size == 1 or size < min_shard_size:
        return P()
    candidates = [d for d in range(len(shape)) if shape[d] % model_size == 0]
    if not candidates:
        return P()
    dim = max(candidates, key=lambda d: shape[d])
    return P(*[MODEL_AXIS if d == dim else None for d in range(len(shape))])


def param_shardings(params_like: Any, mesh: Mesh, min_shard_size: int) -> Any:
    """NamedSharding per leaf of ``params_like`` (arrays or ShapeDtypeStructs)."""
    model_size = mesh.shape[MODEL_AXIS]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), model_size, min_shard_size)),
        params_like,
    )


def stacked_shardings(shardings: Any) -> Any:
    """Shardings for a stacked tree whose leaves gain a replicated leading axis."""
    return jax.tree.map(lambda s: NamedSharding(s.mesh, P(None, *s.spec)), shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis over 'data'; usable as a prefix for a whole batch dict."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings: the restore target for any topology."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def bytes_per_device(tree: Any) -> int:
    """Bytes of ``tree`` held on the most loaded device (sharded leaves count their shard)."""
    per_device: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)


@functools.lru_cache(maxsize=64)
def process_rows(mesh: Mesh, global_batch_size: int) -> dict[int, tuple[int, ...]]:
    """For every process, the rows of a 'data'-sharded global batch that its devices hold, sorted.

    Read off the batch sharding itself, for all devices (also other processes'), so every process
    knows every other's rows without communicating. With the 'model' axis inside a host, each
    process holds its own rows; when 'model' spans hosts (a pod slice), several processes hold the
    same rows (replicas) and must supply the same data. A topology-aware mesh may give a process
    several separate blocks of rows: ``jax.make_array_from_process_local_data`` takes them
    concatenated in order.
    """
    index_map = batch_sharding(mesh).devices_indices_map((global_batch_size,))
    rows: dict[int, set[int]] = {}
    for device, index in index_map.items():
        block = range(*index[0].indices(global_batch_size))
        rows.setdefault(device.process_index, set()).update(block)
    sizes = {len(r) for r in rows.values()}
    if len(sizes) != 1:
        raise MeshError(
            f"processes hold unequal numbers of batch rows ({ {p: len(r) for p, r in rows.items()} }); "
            "every process must have the same number of devices on the 'data' axis"
        )
    return {p: tuple(sorted(r)) for p, r in sorted(rows.items())}


def local_rows(mesh: Mesh, global_batch_size: int) -> np.ndarray:
    """The rows of a 'data'-sharded global batch this process supplies (see ``process_rows``)."""
    return np.asarray(process_rows(mesh, global_batch_size)[jax.process_index()], np.int64)


def row_groups(mesh: Mesh, global_batch_size: int) -> tuple[int, int, bool]:
    """(number of row groups, this process' group, whether it leads the group).

    Processes of one group supply the same rows of every global batch, so they must read the same
    examples; the leader (the lowest-numbered process of the group) alone writes what the group
    computed. On the usual mesh (the 'model' axis within a host) every process is its own group.
    """
    rows = process_rows(mesh, global_batch_size)
    groups = sorted(set(rows.values()))
    mine = rows[jax.process_index()]
    leader = min(p for p, r in rows.items() if r == mine)
    return len(groups), groups.index(mine), leader == jax.process_index()


def to_global(
    local_batch: dict[str, np.ndarray], mesh: Mesh, global_batch_size: int
) -> dict[str, jax.Array]:
    """This process' rows (``local_rows``) of a batch → one global array per column over 'data'."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(
            sharding, np.asarray(v), (global_batch_size, *np.shape(v)[1:])
        )
        for k, v in local_batch.items()
    }


def to_host_local(array: jax.Array) -> np.ndarray:
    """The rows of a 'data'-sharded global array held by this process, in global order."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen: set[int] = set()
    rows = []
    for s in shards:
        start = s.index[0].start or 0
        if start not in seen:  # replicas over 'model' hold the same rows
            seen.add(start)
            rows.append(np.asarray(s.data))
    return np.concatenate(rows, axis=0)


def replicated_to_host(array: jax.Array) -> np.ndarray:
    """A replicated global array as numpy, on any process (every process holds a full copy)."""
    return np.asarray(array.addressable_data(0))
