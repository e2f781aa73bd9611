"""``arnoldi.basis_storage``: where the Krylov basis of the Arnoldi method lives, checked before any
work and sized from the mesh (``parallel/krylov_storage.py`` holds the programs).

- ``device``: all n + 1 rows on the devices (fastest; (n + 1) · p · 4 B over the 'model' axis).
- ``host``: in host memory, each process its own shards; the devices hold two blocks of rows.
- ``disk``: in ``<results>/krylov_basis`` (scratch: rebuilt from the Krylov checkpoint pieces at
  every start, removed when the fit ends).
- ``auto``: the whole basis on the devices when it fits ``arnoldi.memory_budget_mb`` (0: half the
  free memory of a device), else as many blocks as fit there and the rest in host memory.
"""

import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np

from methods.base import Context
from parallel.krylov_storage import OnDevice, Storage, Streamed
from parallel.offload import DiskStore, HostStore, host_memory_kind, row_bytes
from parallel.products import budget_bytes
from runtime.errors import InputError

STORAGES = ("device", "host", "disk", "auto")
STREAMED_ORTHOGONALIZATION = "bcgs2"
GIB = 2**30
# Rows on the devices besides the stored ones while streaming: q_k, w, two blocks in flight.
WORKING_BLOCKS = 2


def check(a: ml_collections.ConfigDict) -> None:
    """Config checks of the ``arnoldi.basis_storage`` fields (one line each)."""
    if a.basis_storage not in STORAGES:
        raise InputError(f"arnoldi.basis_storage={a.basis_storage!r}; choose one of {STORAGES}")
    if a.block_rows < 1:
        raise InputError(f"arnoldi.block_rows={a.block_rows} must be at least 1")
    if a.memory_budget_mb < 0:
        raise InputError(
            f"arnoldi.memory_budget_mb={a.memory_budget_mb} must be 0 (half the free device "
            "memory) or a number of MiB"
        )
    if a.basis_storage != "device" and a.orthogonalization != STREAMED_ORTHOGONALIZATION:
        raise InputError(
            f"arnoldi.basis_storage={a.basis_storage} streams the basis in blocks, which needs "
            f"arnoldi.orthogonalization={STREAMED_ORTHOGONALIZATION} (block Gram–Schmidt; "
            f"{a.orthogonalization} reads the rows one at a time); add "
            f"--config.arnoldi.orthogonalization={STREAMED_ORTHOGONALIZATION}"
        )


def make(ctx: Context, storage: str | None = None) -> Storage:
    """The storage ``arnoldi.basis_storage`` (or ``storage``) names, sized for this mesh; raises
    ``InputError`` when the basis cannot fit where it is asked to live."""
    a = ctx.config.arnoldi
    storage = storage or a.basis_storage
    like = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, np.dtype(a.basis_dtype)), ctx.vectors_like
    )
    rows = a.num_iters + 1
    device_row, process_row = row_bytes(like, ctx.vector_sh)
    on_device = _device_blocks(a, device_row) if storage == "auto" else 0
    if storage == "device" or on_device is None:
        return OnDevice(like, a.num_iters, ctx.vector_sh, ctx.mesh)
    if storage == "disk":
        directory = ctx.results / "krylov_basis"
        if "://" in str(directory):
            raise InputError(
                f"arnoldi.basis_storage=disk keeps the basis under the workdir, which must be a "
                f"local or mounted path, not {ctx.workdir}; use arnoldi.basis_storage=host"
            )
        _check_disk(directory, rows * process_row)
        make_store = lambda: DiskStore(directory, like, rows, a.block_rows, ctx.vector_sh)  # noqa: E731
    else:
        _check_host(rows * process_row, a.block_rows * process_row * on_device)
        make_store = lambda: HostStore(  # noqa: E731
            like, rows, a.block_rows, ctx.vector_sh, on_device
        )
    return Streamed(
        make_store, like, a.num_iters, ctx.vector_sh, ctx.mesh, _eig_rows(ctx, a, device_row)
    )


def _eig_rows(ctx: Context, a: ml_collections.ConfigDict, per_device: int) -> int | None:
    """Rows of G = Uᵀ Q the devices accumulate at once beside two blocks of the basis: None (all
    p̃ at once, G left on the devices) when they fit the budget, else as many as fit, G in host
    memory (a sweep of the basis per group)."""
    top_k = ctx.config.distill.top_k
    row = per_device * 4 // np.dtype(a.basis_dtype).itemsize  # G is float32
    spare = budget_bytes(a.memory_budget_mb) - WORKING_BLOCKS * a.block_rows * per_device
    if top_k * row <= spare or host_memory_kind() is None:
        return None
    return max(1, int(spare // row))


def _device_blocks(a: ml_collections.ConfigDict, per_device: int) -> int | None:
    """``auto``: how many blocks of rows fit the device budget (per device; ``per_device``: a
    row's bytes on a device); None when the whole basis does."""
    budget = budget_bytes(a.memory_budget_mb)
    if (a.num_iters + 1) * per_device <= budget:
        return None
    spare = budget - (WORKING_BLOCKS * a.block_rows + a.block_rows + 2) * per_device
    return max(0, int(spare // (a.block_rows * per_device)))


def available_host_bytes() -> int:
    """Host memory a new allocation can have: MemAvailable (Linux), else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_host(basis_bytes: int, on_device: int) -> None:
    if host_memory_kind() is None:
        raise InputError(
            "arnoldi.basis_storage: the devices have no host memory kind to keep the basis in; "
            "use arnoldi.basis_storage=disk"
        )
    need, have = basis_bytes - on_device, available_host_bytes()
    if need > have:
        raise InputError(
            f"the Krylov basis needs {need / GIB:.2f} GiB of host memory on this process and "
            f"{have / GIB:.2f} GiB is available; use arnoldi.basis_storage=disk, "
            "arnoldi.basis_dtype=bfloat16, fewer arnoldi.num_iters, or more processes"
        )


def _check_disk(directory: Any, basis_bytes: int) -> None:
    path = directory
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(str(path)).free
    if basis_bytes > free:
        raise InputError(
            f"the Krylov basis needs {basis_bytes / GIB:.2f} GiB on disk under {directory} and "
            f"{free / GIB:.2f} GiB is free; free space there, use another --workdir, or "
            "arnoldi.basis_dtype=bfloat16 or fewer arnoldi.num_iters"
        )
