"""Where the Krylov basis lives (``arnoldi.basis_storage``): seconds per Arnoldi iteration with the
basis on the devices, in host memory and on disk, and a basis several times the memory the
process may use, run to the end under that hard cap.

    .venv/bin/python -m benchmarks.basis_storage --part=speed [--num_iters=64] [--batch_size=256]
    .venv/bin/python -m benchmarks.basis_storage --part=cap [--params=25000000] [--num_iters=100] \\
        [--cap_gb=2.5] [--block_rows=2]
    .venv/bin/python -m benchmarks.basis_storage --part=bandwidth [--params=25000000] \\
        [--num_iters=16] [--block_rows=4]

``speed``: the Flax CNN (824k params, untrained: costs do not depend on the values) and one fixed
batch of ``--batch_size`` MNIST images; n = ``--num_iters`` Arnoldi iterations with bcgs2 in blocks
of ``--block_rows``, once per storage (device, host, disk, in that order, after one warm-up run of
each; then the device basis with the default mgs2), every storage through ``parallel/krylov_storage.py`` as the method runs it. It prints
seconds per iteration, the ratios host/device and disk/device from this one run, and the
Hessenberg matrices' largest relative difference from the device run's.

``bandwidth``: GB/s of a block's transfer from host memory and from disk (``--params`` float32
parameters, ``--num_iters`` + 1 rows, the second sweep timed) and of reading it on the devices:
the figures ``docs/benchmarks.md`` plans larger models with.

``cap``: a synthetic HVP, H = diag(d) over ``--params`` parameters (two leaves), d_i = 10 · 0.8^i
for the first 30 and 10⁻³ (1 + i/p) after: the top eigenvalues are known exactly and the HVP costs
one pass over v, so the run is all basis traffic. The basis is (n + 1) · p · 4 B (float32) on disk
(``--storage=disk``, under ``--workdir``); the run is a child process in a memory cgroup limited to
``--cap_gb`` (resident memory and page cache: a process over it is killed), or, where no cgroup
can be made, under ``prlimit --as`` (its whole address space, a harder cap). It prints the cap,
the basis' bytes, the child's peak RSS, seconds, and the top-10 Ritz values against the truth and
against an uncapped device run at ``--check_params`` parameters where both fit.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from influence import krylov
from influence.hvp import make_hvp
from parallel import krylov_storage
from parallel.mesh import make_mesh
from parallel.offload import DiskStore, HostStore
from parallel.sharding import batch_sharding, param_shardings
from tasks import mnist
from tasks.sources import read_all

FLAGS = flags.FLAGS
flags.DEFINE_enum("part", "speed", ["speed", "cap", "bandwidth", "child"], "What to measure.")
flags.DEFINE_integer("num_iters", 64, "Arnoldi iterations n.")
flags.DEFINE_integer("batch_size", 256, "[speed] Examples in the fixed HVP batch.")
flags.DEFINE_integer("block_rows", 8, "Rows per bcgs2 block and per transfer.")
flags.DEFINE_integer("params", 25_000_000, "[cap] Parameters of the synthetic HVP.")
flags.DEFINE_integer("check_params", 2_000_000, "[cap] Parameters of the capped/uncapped check.")
flags.DEFINE_float("cap_gb", 2.5, "[cap] Address-space cap of the run (GB, 10^9 bytes).")
flags.DEFINE_enum("storage", "disk", ["device", "host", "disk"], "[cap] The capped run's storage.")
flags.DEFINE_string("workdir", "", "[cap] Where the disk basis goes (default: a temporary dir).")
flags.DEFINE_string("out", "", "[child] Where the child writes its result (JSON).")

TOP = 30  # the synthetic spectrum's separated eigenvalues


def make_storage(where: str, like: Any, sh: Any, mesh: Any, directory: Path) -> Any:
    n, rows, block = FLAGS.num_iters, FLAGS.num_iters + 1, FLAGS.block_rows
    if where == "device":
        return krylov_storage.OnDevice(like, n, sh, mesh)
    make = {
        "host": lambda: HostStore(like, rows, block, sh),
        "disk": lambda: DiskStore(directory, like, rows, block, sh),
    }[where]
    return krylov_storage.Streamed(make, like, n, sh, mesh)


def arnoldi(
    storage: Any, hvp: Any, params: Any, batch: Any, param_sh: Any, gs: str = "bcgs2"
) -> tuple[float, Any]:
    """(seconds, Hessenberg matrix) of n iterations, the device idle at the start and the end."""
    step = storage.step(hvp, param_sh, 1e-4, gs, FLAGS.block_rows)
    state = storage.init(jax.random.key(0))
    jax.block_until_ready(state["hessenberg"])
    start = time.perf_counter()
    result = krylov.run_arnoldi(step, state, params, lambda k: batch, FLAGS.num_iters)
    hessenberg = np.asarray(result.state["hessenberg"])
    return time.perf_counter() - start, hessenberg


def speed(directory: Path) -> None:
    task = mnist.make_task("flax_cnn")
    mesh = make_mesh(1, 1, 1)
    params = task.init_params(jax.random.key(0))
    param_sh = param_shardings(params, mesh, 4096)
    params = jax.device_put(params, param_sh)
    split = mnist.load_splits(num_train=FLAGS.batch_size, num_eval=0, flip_fraction=0.0, seed=0)
    batch = jax.device_put(task.model_inputs(read_all(split[0])), batch_sharding(mesh))
    like = jax.eval_shape(lambda: params)
    hvp = make_hvp(task.per_example_loss, 1e-3)
    seconds, matrices = {}, {}
    for name in ("device", "host", "disk", "device mgs2"):
        where, gs = [*name.split(), "bcgs2"][:2]
        storage = make_storage(where, like, param_sh, mesh, directory)
        arnoldi(storage, hvp, params, batch, param_sh, gs)  # compiles
        seconds[name], matrices[name] = arnoldi(storage, hvp, params, batch, param_sh, gs)
        storage.close()
    n, p = FLAGS.num_iters, sum(x.size for x in jax.tree.leaves(like))
    print(
        f"\nFlax CNN, p = {p:,}, n = {n}, b = {FLAGS.batch_size}, bcgs2 blocks of "
        f"{FLAGS.block_rows}; basis {(n + 1) * p * 4 / 2**20:.0f} MiB (float32)"
    )
    print("| storage | s / iteration | ratio to device | max rel. diff. of H̃ |")
    print("|---|---|---|---|")
    ref = matrices["device"]
    for where, s in seconds.items():
        diff = np.abs(matrices[where] - ref).max() / np.abs(ref).max()
        print(f"| {where} | {s / n:.3f} | {s / seconds['device']:.2f} | {diff:.1e} |")


def bandwidth(directory: Path) -> None:
    """GB/s of what an iteration moves: a block's rows read on the devices (a BCGS dot product),
    a block brought from host memory, and from disk, through the stores Arnoldi uses."""
    mesh = make_mesh(1, 1, 1)
    like = {"v": jax.ShapeDtypeStruct((FLAGS.params,), jnp.float32)}
    sh = param_shardings(like, mesh, 1)
    rows, size = FLAGS.num_iters + 1, FLAGS.block_rows
    v = jax.device_put({"v": jnp.ones(FLAGS.params, jnp.float32)}, sh)
    stores = {
        "host memory -> device": HostStore(like, rows, size, sh),
        "disk -> device": DiskStore(directory, like, rows, size, sh),
    }
    block_bytes = size * FLAGS.params * 4
    print(
        f"\n{FLAGS.params:,} float32 params, blocks of {size} rows ({block_bytes / 1e6:.0f} MB), "
        f"{rows} rows; median GB/s over the blocks"
    )
    print("| path | GB/s |\n|---|---|")
    dot = jax.jit(lambda b, v: jnp.tensordot(b["v"], v["v"], axes=1))
    for name, store in stores.items():
        for k in range(rows):
            store.write_row(k, v)
        times, blocks = [], list(range(store.num_blocks))
        for j in blocks * 2:  # the second sweep is timed
            start = time.perf_counter()
            block = jax.block_until_ready(store.fetch(j)())
            times.append(time.perf_counter() - start)
        print(f"| {name} | {block_bytes / np.median(times[len(blocks) :]) / 1e9:.2f} |")
        if name.startswith("host"):
            jax.block_until_ready(dot(block, v))
            start = time.perf_counter()
            for _ in range(5):
                jax.block_until_ready(dot(block, v))
            print(
                f"| device (a block's dot product) | {5 * block_bytes / (time.perf_counter() - start) / 1e9:.2f} |"
            )
        store.close()


def synthetic(num_params: int) -> tuple[Any, Any, np.ndarray]:
    """(params, hvp, the top eigenvalues) of H = diag(d) over two leaves of ``num_params``."""
    half = num_params // 2
    sizes = (half, num_params - half)

    def diagonal(offset: int, size: int) -> jax.Array:
        i = (offset + jnp.arange(size)).astype(jnp.float32)
        tail = 1e-3 * (1.0 + i / num_params)
        return jnp.where(i < TOP, 10.0 * 0.8 ** jnp.minimum(i, TOP), tail)

    def hvp(params: Any, batch: Any, v: Any) -> Any:
        del params, batch
        return {"a": diagonal(0, sizes[0]) * v["a"], "b": diagonal(sizes[0], sizes[1]) * v["b"]}

    like = {k: jax.ShapeDtypeStruct((s,), jnp.float32) for k, s in zip("ab", sizes, strict=True)}
    return like, hvp, 10.0 * 0.8 ** np.arange(TOP)


def child() -> None:
    """One synthetic run (in the capped child process): writes seconds and Ritz values."""
    mesh = make_mesh(1, 1, 1)
    like, hvp, _ = synthetic(FLAGS.params)
    sh = param_shardings(like, mesh, 1)
    storage = make_storage(FLAGS.storage, like, sh, mesh, Path(FLAGS.workdir))
    seconds, h = arnoldi(storage, hvp, {}, {}, {})
    storage.close()
    m = FLAGS.num_iters
    ritz = np.sort(np.linalg.eigvalsh(0.5 * (h[:m, :m] + h[:m, :m].T)))[::-1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
    result = {"seconds": seconds, "ritz": ritz[:10].tolist(), "peak_rss_gb": peak}
    Path(FLAGS.out).write_text(json.dumps(result))


def run_child(num_params: int, storage: str, cap_gb: float | None, workdir: Path) -> dict:
    out = workdir / f"{storage}-{num_params}.json"
    command = [
        sys.executable, "-m", "benchmarks.basis_storage", "--part=child",
        f"--params={num_params}", f"--num_iters={FLAGS.num_iters}", f"--storage={storage}",
        f"--block_rows={FLAGS.block_rows}", f"--workdir={workdir / 'basis'}", f"--out={out}",
    ]  # fmt: skip
    group = memory_cgroup(cap_gb) if cap_gb is not None else None
    if group is not None:  # the child joins the cgroup before it starts Python
        command = ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh", *command]
    elif cap_gb is not None:
        command = ["prlimit", f"--as={int(cap_gb * 1e9)}", *command]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    finally:
        if group is not None:
            group.rmdir()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["cap"] = "none" if cap_gb is None else ("cgroup" if group else "prlimit --as")
    return result


def memory_cgroup(cap_gb: float) -> Path | None:
    """A new memory cgroup limited to ``cap_gb`` (resident memory and page cache, no swap), or
    None where none can be made (not root, no cgroup filesystem): then ``prlimit --as``."""
    name = f"basis_storage_{os.getpid()}"
    v1, v2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
    limits = (
        [(v1 / name, "memory.limit_in_bytes"), (v1 / name, "memory.memsw.limit_in_bytes")]
        if v1.is_dir()
        else [(v2 / name, "memory.max"), (v2 / name, "memory.swap.max")]
    )
    group = limits[0][0]
    try:
        group.mkdir()
        (group / limits[0][1]).write_text(str(int(cap_gb * 1e9)))
    except OSError:
        return None
    try:
        (group / limits[1][1]).write_text(str(int(cap_gb * 1e9)) if v1.is_dir() else "0")
    except OSError:
        pass  # no swap accounting: there is no swap to escape to either
    return group


def cap(workdir: Path) -> None:
    n, cap_gb = FLAGS.num_iters, FLAGS.cap_gb
    truth = 10.0 * 0.8 ** np.arange(10)
    small = FLAGS.check_params
    uncapped = run_child(small, "device", None, workdir)
    capped_small = run_child(small, FLAGS.storage, cap_gb, workdir)
    big = run_child(FLAGS.params, FLAGS.storage, cap_gb, workdir)
    basis_gb = (n + 1) * FLAGS.params * 4 / 1e9
    print(
        f"\nsynthetic diag HVP, n = {n}, bcgs2 blocks of {FLAGS.block_rows}, "
        f"storage={FLAGS.storage}, cap ({big['cap']}) {cap_gb} GB"
    )
    print("| run | params | basis GB | basis / cap | peak RSS GB | s | max rel. err. top-10 λ |")
    print("|---|---|---|---|---|---|---|")
    for name, p, r in (
        ("device, uncapped", small, uncapped),
        (f"{FLAGS.storage}, capped", small, capped_small),
        (f"{FLAGS.storage}, capped", FLAGS.params, big),
    ):
        gb = (n + 1) * p * 4 / 1e9
        err = np.max(np.abs(np.asarray(r["ritz"]) - truth) / truth)
        print(
            f"| {name} | {p:,} | {gb:.2f} | {gb / cap_gb:.2f} | {r['peak_rss_gb']:.2f} | "
            f"{r['seconds']:.0f} | {err:.1e} |"
        )
    diff = np.max(np.abs(np.subtract(capped_small["ritz"], uncapped["ritz"])) / truth)
    print(
        f"\ncapped vs uncapped at {small:,} params: top-10 λ max rel. diff. {diff:.1e}; "
        f"basis {basis_gb:.1f} GB = {basis_gb / cap_gb:.1f}x the cap"
    )


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.part == "child":
        return child()
    workdir = Path(FLAGS.workdir or tempfile.mkdtemp(prefix="basis_storage_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        {"speed": speed, "cap": cap, "bandwidth": bandwidth}[FLAGS.part](workdir)
    finally:
        if not FLAGS.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return None


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", "")
    app.run(main)
