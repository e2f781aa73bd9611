"""Krylov checkpoints: bytes and seconds per save against the iteration reached, pieces against
whole states, on the same basis.

    .venv/bin/python -m benchmarks.krylov_saves [--params=4000000] [--num_iters=40] \\
        [--checkpoint_every=5]

A Krylov state of ``--params`` float32 parameters (one leaf, on this process' devices, laid out
as Arnoldi lays it out: ``parallel/programs.krylov_shardings``) and n = ``--num_iters``; basis row
k is filled with noise at iteration k (the save cost does not depend on the values; it is written
through the same code as ``methods/arnoldi.py``). Every ``--checkpoint_every`` iterations it is
saved twice, each save blocking (async off, so the seconds are the write's): as a piece
(``checkpoints/pieces.py``: the rows and Hessenberg columns since the last save) and as the whole
state (what every save wrote before pieces). Bytes are the step directory's size on disk. It
prints one line per save, the ratio of the last piece's bytes to the first's (flat = 1.0), the
whole state's bytes over the piece's at the last save, and, from the write throughput measured on
the largest whole save, the seconds one save would take for a 300M-parameter model at n = 200
(the paper's ViT-L/32 scale) with ``checkpoint_every`` = 10.
"""

import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from checkpoints.checkpointer import Checkpointer
from checkpoints.pieces import Pieces
from influence import krylov
from parallel import programs

_PARAMS = flags.DEFINE_integer("params", 4_000_000, "Parameters p (float32).")
_ITERS = flags.DEFINE_integer("num_iters", 40, "Arnoldi iterations n.")
_EVERY = flags.DEFINE_integer("checkpoint_every", 5, "Iterations between saves.")
TARGET_PARAMS, TARGET_ITERS, TARGET_EVERY = 300_000_000, 200, 10


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def _fill(state: krylov.KrylovState, k: int) -> krylov.KrylovState:
    """Row k + 1 and column k as iteration k leaves them (noise)."""
    key = jax.random.key(k)
    basis = jax.tree.map(
        lambda b: jax.lax.dynamic_update_index_in_dim(
            b, jax.random.normal(key, b.shape[1:], b.dtype), k + 1, 0
        ),
        state["krylov_basis"],
    )
    column = jax.random.normal(key, state["hessenberg"].shape[:1], jnp.float32)
    hessenberg = jax.lax.dynamic_update_index_in_dim(state["hessenberg"], column, k, 1)
    return krylov.KrylovState(krylov_basis=basis, hessenberg=hessenberg)


def _save(ckpt: Checkpointer, step: int, state: object, meta: dict) -> tuple[int, float]:
    start = time.perf_counter()
    ckpt.save(step, state, meta, force=True)
    ckpt.wait_until_finished()
    return _size(ckpt.directory / str(step)), time.perf_counter() - start


def main(argv: list[str]) -> None:
    del argv
    p, n, every = _PARAMS.value, _ITERS.value, _EVERY.value
    mesh = Mesh(np.array(jax.devices()), ("model",))
    vector_sh = {"w": NamedSharding(mesh, P("model"))}
    state_sh = programs.krylov_shardings(vector_sh, mesh)
    like = {"w": jax.ShapeDtypeStruct((p,), jnp.float32)}
    state = programs.jit_init_krylov_state(like, n, vector_sh, mesh)(jax.random.key(0))
    fill = jax.jit(_fill, static_argnums=1, donate_argnums=0, out_shardings=state_sh)
    take = programs.jit_take_piece(state_sh)
    print(f"p = {p:,} float32, n = {n}, checkpoint_every = {every}, {len(mesh.devices)} device(s)")
    print(f"{'k':>5} {'piece MB':>10} {'piece s':>9} {'whole MB':>10} {'whole s':>9}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        whole = Checkpointer(Path(tmp) / "whole", max_to_keep=1, async_save=False)
        pieces = Pieces(Checkpointer(Path(tmp) / "pieces", max_to_keep=None, async_save=False))
        for k in range(n):
            state = fill(state, k)
            done = k + 1
            if done % every and done != n:
                continue
            bounds = ((pieces.last + 1 if pieces.last else 0, done + 1), (pieces.last, done))
            start = time.perf_counter()
            pieces.save(done, take(state, *bounds), {"iteration": done})
            pieces.checkpointer.wait_until_finished()
            piece = (_size(pieces.checkpointer.directory / str(done)), time.perf_counter() - start)
            rows.append((done, *piece, *_save(whole, done, state, {"iteration": done})))
            print(
                f"{done:>5} {rows[-1][1] / 1e6:>10.1f} {rows[-1][2]:>9.3f} "
                f"{rows[-1][3] / 1e6:>10.1f} {rows[-1][4]:>9.3f}"
            )
        pieces.checkpointer.close()
        whole.close()
    regular = [r for r in rows if r[0] not in (every, n)] or rows  # the first holds q_0 too
    print(f"piece bytes, last regular save / first = {regular[-1][1] / regular[0][1]:.3f}")
    print(f"whole-state bytes / piece bytes at k = {rows[-1][0]}: {rows[-1][3] / rows[-1][1]:.1f}")
    throughput = rows[-1][3] / rows[-1][4]
    print(f"write throughput (largest whole save) = {throughput / 1e6:.0f} MB/s")
    piece_bytes = TARGET_EVERY * TARGET_PARAMS * 4
    whole_bytes = (TARGET_ITERS + 1) * TARGET_PARAMS * 4
    print(
        f"at {TARGET_PARAMS / 1e6:.0f}M params, n = {TARGET_ITERS}, checkpoint_every = "
        f"{TARGET_EVERY}, this throughput: piece {piece_bytes / 1e9:.0f} GB = "
        f"{piece_bytes / throughput:.0f} s, whole state {whole_bytes / 1e9:.0f} GB = "
        f"{whole_bytes / throughput:.0f} s per save"
    )


if __name__ == "__main__":
    app.run(main)
