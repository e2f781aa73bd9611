"""Where Arnoldi's Krylov basis lives, and the programs that use it there
(``arnoldi.basis_storage``): one interface for the method, whichever the storage.

- ``OnDevice``: the whole (n + 1)-row basis one sharded array per leaf on the devices; each
  iteration is one jitted program (``krylov.arnoldi_step``), the incoming state donated.
- ``Streamed``: the rows in a ``parallel/offload.py`` store (host memory, disk, or host memory
  with its first blocks on the devices). An iteration is the HVP program, then Gram–Schmidt as
  BCGS2 (``krylov.block_pass``): two sweeps over the blocks of rows 0 … k, block j + 1's transfer
  running while block j's compute runs (double buffering, ``offload.stream``), then lines 8–9 and
  q_{k+1} written back.
  Only q_k, w, two blocks in flight and the Hessenberg matrix are on the devices. MGS cannot
  stream (k + 1 dependent reads of one row each) and CGS2 reads the basis four times (its update
  needs every dot product first): BCGS2 reads it twice, in blocks large enough to hide the
  transfer's latency.

Both keep the Hessenberg matrix on the devices, and the state as a ``krylov.KrylovState`` whose
``krylov_basis`` is the stacked tree (on device) or the store. Saves and restores go through
pieces of stacked rows on the devices (``take``, ``write``), so a state saved with one storage
resumes with another.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from influence import krylov, pytree
from influence.hvp import HVP
from parallel import offload, programs
from parallel.offload import DiskStore, HostStore
from parallel.sharding import batch_sharding, bytes_per_device, replicated, stacked_shardings

MIB = 2**20


class OnDevice:
    """Today's layout: the basis wholly on the devices."""

    def __init__(self, like: Any, num_iters: int, vector_sh: Any, mesh: Mesh) -> None:
        self.like, self.num_iters, self.vector_sh, self.mesh = like, num_iters, vector_sh, mesh
        state_sh = programs.krylov_shardings(vector_sh, mesh)
        self._take = programs.jit_take_piece(state_sh)
        self._write = programs.jit_write_piece(state_sh)

    def init(self, key: jax.Array) -> krylov.KrylovState:
        fn = programs.jit_init_krylov_state(self.like, self.num_iters, self.vector_sh, self.mesh)
        return fn(key)

    def take(
        self, state: krylov.KrylovState, rows: tuple[int, int], columns: tuple[int, int]
    ) -> krylov.KrylovState:
        return self._take(state, rows, columns)

    def write(
        self, state: krylov.KrylovState, piece: krylov.KrylovState, r0: int, c0: int
    ) -> krylov.KrylovState:
        return self._write(state, piece, r0, c0)

    def step(
        self, hvp: HVP, param_sh: Any, breakdown_tol: float, orthogonalization: str, block: int
    ) -> krylov.StepFn:
        return programs.jit_arnoldi_step(
            hvp, param_sh, self.vector_sh, self.mesh, breakdown_tol, orthogonalization, block
        )

    def to_parameter_space(self, coords: np.ndarray, state: krylov.KrylovState) -> Any:
        fn = programs.jit_to_parameter_space(self.vector_sh, self.mesh)
        return fn(coords, state["krylov_basis"])

    def describe(self, state: krylov.KrylovState) -> str:
        on = bytes_per_device(state["krylov_basis"])
        return f"{on / MIB:.1f} MiB on the most loaded device"

    def close(self) -> None:
        pass


class Streamed:
    """The basis in a store off the devices (``parallel/offload.py``), streamed a block at a time."""

    def __init__(
        self,
        make_store: Callable[[], HostStore | DiskStore],
        like: Any,
        num_iters: int,
        vector_sh: Any,
        mesh: Mesh,
        eig_rows: int | None = None,
    ) -> None:
        """``eig_rows``: rows of G the devices accumulate at once (``to_parameter_space``); None:
        all of them, G left on the devices."""
        self.make_store, self.like, self.num_iters = make_store, like, num_iters
        self.eig_rows = eig_rows
        self.vector_sh, self.mesh = vector_sh, mesh
        self.store: HostStore | DiskStore | None = None
        self.head: tuple[int, Any] | None = None  # (row, the row on the devices): the next q_k
        self.repl = replicated(mesh)
        self.block_sh = stacked_shardings(vector_sh)
        self._get_row = jax.jit(pytree.stacked_get, out_shardings=vector_sh)
        self._get_rows = jax.jit(_rows_of, static_argnums=2, out_shardings=self.block_sh)
        self._set_columns = jax.jit(
            lambda h, p, c0: jax.lax.dynamic_update_slice_in_dim(h, p, c0, 1),
            out_shardings=self.repl,
            donate_argnums=0,
        )

    def init(self, key: jax.Array) -> krylov.KrylovState:
        if self.store is not None:
            self.store.close()
        self.store = self.make_store()
        q0 = jax.jit(krylov.start_vector, out_shardings=self.vector_sh)(self.like, key)
        self._write_row(0, q0)
        hessenberg = jax.jit(
            lambda: jnp.zeros((self.num_iters + 1, self.num_iters), jnp.float32),
            out_shardings=self.repl,
        )()
        return krylov.KrylovState(krylov_basis=self.store, hessenberg=hessenberg)

    def _write_row(self, row: int, vector: Any) -> None:
        self.store.write_row(row, vector)
        self.head = (row, vector)

    def row(self, row: int) -> Any:
        """Basis row ``row`` on the devices (the last one written is kept there)."""
        if self.head is not None and self.head[0] == row:
            return self.head[1]
        j, i = divmod(row, self.store.block_rows)
        return self._get_row(self.store.fetch(j)(), i)

    def take(
        self, state: krylov.KrylovState, rows: tuple[int, int], columns: tuple[int, int]
    ) -> krylov.KrylovState:
        size = self.store.block_rows
        blocks = tuple(
            self.store.fetch(j)() for j in range(rows[0] // size, (rows[1] - 1) // size + 1)
        )
        basis = self._get_rows(blocks, rows[0] % size, rows[1] - rows[0])
        hessenberg = state["hessenberg"][:, columns[0] : columns[1]]
        return krylov.KrylovState(
            krylov_basis=basis, hessenberg=jax.device_put(hessenberg, self.repl)
        )

    def write(
        self, state: krylov.KrylovState, piece: krylov.KrylovState, r0: int, c0: int
    ) -> krylov.KrylovState:
        rows = jax.tree.leaves(piece["krylov_basis"])[0].shape[0]
        for i in range(rows):
            self._write_row(r0 + i, self._get_row(piece["krylov_basis"], i))
        hessenberg = self._set_columns(state["hessenberg"], piece["hessenberg"], c0)
        return krylov.KrylovState(krylov_basis=self.store, hessenberg=hessenberg)

    def step(
        self, hvp: HVP, param_sh: Any, breakdown_tol: float, orthogonalization: str, block: int
    ) -> krylov.StepFn:
        del orthogonalization, block  # BCGS2 over the store's blocks (checked by the method)
        vec, repl = self.vector_sh, self.repl
        apply = jax.jit(
            lambda p, b, q: krylov.apply_hvp(hvp, p, b, q),
            in_shardings=(param_sh, batch_sharding(self.mesh), vec),
            out_shardings=(vec, repl),
        )
        sweep = jax.jit(
            krylov.block_pass,
            in_shardings=(self.block_sh, vec, repl, repl, repl, repl),
            out_shardings=(vec, repl),
        )
        complete = jax.jit(
            lambda *args: krylov.complete(*args, breakdown_tol),
            out_shardings=(vec, repl, repl),
        )

        def step(state: krylov.KrylovState, params: Any, batch: Any, k: jax.Array) -> Any:
            k = int(k)
            w, hvp_norm = apply(params, batch, self.row(k))  # line 4
            coeffs = jnp.zeros((self.num_iters + 1,), jnp.float32)
            w, coeffs = self._sweeps(sweep, w, coeffs, k)  # lines 5–7, twice
            q_next, hessenberg, info = complete(w, coeffs, hvp_norm, state["hessenberg"], k)
            self._write_row(k + 1, q_next)  # line 9
            return krylov.KrylovState(krylov_basis=self.store, hessenberg=hessenberg), info

        return step

    def _sweeps(self, sweep: Callable, w: Any, coeffs: jax.Array, k: int) -> tuple[Any, Any]:
        """Two BCGS passes over blocks 0 … k // B."""
        size = self.store.block_rows
        blocks = list(range(k // size + 1)) * 2

        def use(j: int, block: Any) -> jax.Array:
            nonlocal w, coeffs
            w, coeffs = sweep(block, w, coeffs, j * size, j * size, k)
            return coeffs

        offload.stream(self.store.fetch, blocks, use)
        return w, coeffs

    def to_parameter_space(self, coords: np.ndarray, state: krylov.KrylovState) -> Any:
        """G = Uᵀ Q (Alg. 1 line 17) accumulated block by block over the first m rows; with
        ``eig_rows`` below p̃, ``eig_rows`` rows of G at a time (a sweep of the basis each), each
        group moved to host memory once done: G in host memory (the score job streams it,
        ``parallel/tangent_stream.py``), the devices never holding more than a group."""
        del state
        top = coords.shape[0]
        if self.eig_rows is None or self.eig_rows >= top:
            return self._accumulate(coords)
        host_sh = offload.with_kind(stacked_shardings(self.vector_sh), offload.host_memory_kind())
        logging.info(
            "G (%d rows) distilled into host memory, %d rows a sweep of the basis",
            top,
            self.eig_rows,
        )
        groups = []
        for start in range(0, top, self.eig_rows):
            group = self._accumulate(coords[start : start + self.eig_rows])
            groups.append(jax.block_until_ready(jax.device_put(group, host_sh)))
            del group
        return offload.concat_rows(groups, host_sh)

    def _accumulate(self, coords: np.ndarray) -> Any:
        """Uᵀ ``coords`` on the devices, one sweep of the basis."""
        size, (top, m) = self.store.block_rows, coords.shape
        padded = np.zeros((top, math.ceil(m / size) * size), np.float32)
        padded[:, :m] = coords
        zeros = lambda: pytree.stacked_zeros(  # noqa: E731
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), self.like), top
        )
        eig_sh = stacked_shardings(self.vector_sh)
        g = jax.jit(zeros, out_shardings=eig_sh)()
        add = jax.jit(
            lambda g, u, q: jax.tree.map(jnp.add, g, pytree.stacked_combine(u, q)),
            in_shardings=(eig_sh, self.repl, self.block_sh),
            out_shardings=eig_sh,
            donate_argnums=0,
        )

        def use(j: int, block: Any) -> Any:
            nonlocal g
            g = add(g, padded[:, j * size : (j + 1) * size], block)
            return g

        offload.stream(self.store.fetch, list(range(padded.shape[1] // size)), use)
        return g

    def describe(self, state: krylov.KrylovState) -> str:
        on, off = self.store.bytes_per_device()
        where = "on disk" if isinstance(self.store, DiskStore) else "in host memory"
        return f"{on / MIB:.1f} MiB on the most loaded device, {off / MIB:.1f} MiB {where}"

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


def _rows_of(blocks: tuple, start: jax.Array, count: int) -> Any:
    """Consecutive blocks → their concatenated rows [start, start + count)."""
    return jax.tree.map(
        lambda *b: jax.lax.dynamic_slice_in_dim(jnp.concatenate(b, axis=0), start, count, 0),
        *blocks,
    )


Storage = OnDevice | Streamed
