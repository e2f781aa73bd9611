"""Scoring at scale: memory flat in N, and how busy the input pipeline keeps the device.

    .venv/bin/python -m benchmarks.streaming [--sizes=100000,1000000,10000000] [--busy_batches=6]

[1] A synthetic random-access source (``benchmarks/synthetic.py``: features hashed from the example
    index, a tiny MLP) of each size N: ``jobs.train`` and ``jobs.fit`` (Arnoldi), then
    ``jobs.score`` in a fresh process, whose own peak RSS (``os.wait4``) and logged throughput are
    printed per N, with the RSS ratio between the two largest sizes (flat = 1.0).
[2] The translation ``small`` preset (Transformer, SentencePiece on the embedded corpus; untrained
    params and random orthonormal eigenvectors: the cost does not depend on their values): the
    score job's loop (read ahead by Grain threads, dispatch, fetch the previous batch) against the
    device time alone (the same batches already on the device, dispatched back to back). Busy
    fraction = device time / loop wall time, with reading ahead and inline.
"""

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
RATE = re.compile(r"scoring throughput: ([0-9.]+) examples/s")
_SIZES = flags.DEFINE_list("sizes", ["100000", "1000000", "10000000"], "Examples per run.")
_BUSY_BATCHES = flags.DEFINE_integer("busy_batches", 6, "Scoring batches timed in [2].")
_THREADS = flags.DEFINE_integer("read_threads", 2, "score.read_threads for the read-ahead run.")
_PRESET = flags.DEFINE_string(
    "preset", "", "configs/translation.py presets for [2] (runlocal: smoke)."
)


def _env() -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return env


def _job(name: str, workdir: Path, size: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        f"jobs.{name}",
        f"--config=benchmarks/synthetic.py:{size}",
        f"--workdir={workdir}",
    ]


def score_at(size: int, tmp: Path) -> tuple[float, float, float]:
    """(examples/s, peak RSS MiB of the score process, its wall seconds) at N = ``size``."""
    workdir = tmp / str(size)
    for job in ("train", "fit"):
        subprocess.run(
            _job(job, workdir, size), cwd=REPO, env=_env(), check=True, capture_output=True
        )
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        child = subprocess.Popen(
            _job("score", workdir, size), cwd=REPO, env=_env(), stderr=log, stdout=log
        )
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"score at N={size} failed:\n{output[-3000:]}")
    found = RATE.findall(output)
    return float(found[-1]) if found else float("nan"), usage.ru_maxrss / 1024, wall


def _random_eigvecs(ctx, top_k: int):
    """``top_k`` random orthonormal vectors laid out like the selected params (host arrays)."""
    import jax
    import numpy as np

    from influence import pytree

    leaves, treedef = jax.tree.flatten(ctx.vectors_like)
    flat = np.linalg.qr(
        np.random.default_rng(0).standard_normal((pytree.num_params(ctx.vectors_like), top_k))
    )[0].T
    cuts = np.cumsum([x.size for x in leaves])[:-1]
    return jax.tree.unflatten(
        treedef,
        [
            c.reshape(top_k, *x.shape).astype(np.float32)
            for c, x in zip(np.split(flat, cuts, axis=1), leaves, strict=True)
        ],
    )


def _loop_seconds(read, dispatch, num: int, read_threads: int, read_ahead: int) -> float:
    """Wall seconds of the score job's loop over ``num`` batches (compile excluded): read ahead by
    ``read_threads`` threads (inline with 0), dispatch, fetch the previous batch."""
    import jax
    import numpy as np

    from runtime import prefetch

    jax.block_until_ready(dispatch(read(0)))  # compile
    start, pending = time.perf_counter(), None
    for columns in prefetch.ahead(read, 0, num, read_threads, read_ahead):
        current = dispatch(columns)
        if pending is not None:
            np.asarray(pending)
        pending = current
    np.asarray(pending)
    return time.perf_counter() - start


def _device_seconds(project, params, eigvecs, on_device: list) -> float:
    """Seconds to score batches already on the device, dispatched back to back."""
    import jax

    jax.block_until_ready(on_device)
    start = time.perf_counter()
    outs = [project(params, eigvecs, batch) for batch in on_device]
    jax.block_until_ready(outs)
    return time.perf_counter() - start


def device_busy(read_threads: int, tmp: Path) -> tuple[float, float, float]:
    """(loop wall s, device-only s, busy fraction) of scoring ``--busy_batches`` batches."""
    import jax

    from configs import translation as translation_config
    from parallel import programs, sharding
    from scoring import parts, schedule
    from stages import checks, setup

    config = translation_config.get_config(_PRESET.value or None)
    config.score.read_threads = read_threads
    ctx = setup.context(config, tmp / "translation", checks.check_score)
    b, top_k = config.score.batch_size, config.distill.top_k
    params = jax.jit(ctx.task.init_params, out_shardings=ctx.param_sh)(jax.random.key(0))
    eigvecs = _random_eigvecs(ctx, top_k)
    project = programs.jit_products(
        ctx.task.per_example_loss, ctx.param_sh, ctx.vector_sh, ctx.mesh, None, ctx.selection
    )
    train = ctx.split("train")
    num = min(_BUSY_BATCHES.value, train.num_examples // b)
    plan = schedule.scoring_plan(parts.parts("train", num * b, num * b), 1, 0, b)

    def read(step: int) -> dict:
        return train.take(plan[step].positions)

    def to_device(columns: dict) -> dict:
        return sharding.to_global(ctx.task.model_inputs(columns), ctx.mesh, b)

    def dispatch(columns: dict) -> jax.Array:
        return project(params, eigvecs, to_device(columns))

    wall = _loop_seconds(read, dispatch, num, read_threads, config.score.read_ahead)
    on_device = [to_device(read(s)) for s in range(num)]
    device = _device_seconds(project, params, eigvecs, on_device)
    return wall, device, device / wall


def main(argv: list[str]) -> None:
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        print("[1] scoring a synthetic random-access source (tiny MLP, p̃=4, batch 8192)")
        rss = {}
        for size in map(int, _SIZES.value):
            rate, rss[size], wall = score_at(size, Path(tmp))
            print(
                f"N={size:>11,}: {rate:10.1f} examples/s, peak RSS {rss[size]:7.1f} MiB, score job {wall:6.1f} s"
            )
        sizes = sorted(rss)
        if len(sizes) >= 2:
            print(
                f"peak RSS N={sizes[-1]:,} / N={sizes[-2]:,} = {rss[sizes[-1]] / rss[sizes[-2]]:.3f}"
            )
        print(f"[2] device busy while scoring: translation {_PRESET.value or 'small'} preset")
        for threads in (_THREADS.value, 0):
            wall, device, busy = device_busy(threads, Path(tmp))
            print(
                f"read_threads={threads}: loop {wall:.2f} s, device alone {device:.2f} s, busy fraction = {busy:.3f}"
            )
    print(f"--- {os.cpu_count()} CPU cores ---")


if __name__ == "__main__":
    app.run(main)
