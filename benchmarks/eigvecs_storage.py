"""Where the score job's eigenvectors live (``score.eigvecs_storage``): seconds per batch of forward
mode with G on the devices and with G in host memory, streamed a chunk of tangents at a time.

    .venv/bin/python -m benchmarks.eigvecs_storage [--top_k=64] [--batch_size=256] \\
        [--num_batches=8] [--chunk=16]

The Flax CNN (824k params, untrained: costs do not depend on the values), p̃ = ``--top_k`` random
unit eigenvectors and ``--num_batches`` batches of MNIST images. Both runs go through the score
job's programs (``parallel/products.Program`` in forward mode with its default ``lax.map`` chunks;
``parallel/streamed_products.StreamedProgram`` over ``HostTangents`` of ``--chunk`` rows), after
one warm-up batch each (which compiles). It prints seconds per batch, the ratio host/device from
this one run, and the projections' largest relative difference.
"""

import time
from typing import Any

import jax
import numpy as np
from absl import app, flags

from parallel import products, streamed_products
from parallel.mesh import make_mesh
from parallel.sharding import param_shardings, stacked_shardings
from parallel.tangent_stream import HostTangents
from tasks import mnist
from tasks.sources import read_all

FLAGS = flags.FLAGS
flags.DEFINE_integer("top_k", 64, "Eigenvectors p̃.")
flags.DEFINE_integer("batch_size", 256, "Examples per batch.")
flags.DEFINE_integer("num_batches", 8, "Timed batches.")
flags.DEFINE_integer("chunk", 16, "Tangents per chunk in host memory.")


def timed(
    program: Any, params: Any, tangents: Any, batches: list[dict]
) -> tuple[float, np.ndarray]:
    """(seconds per batch after a warm-up batch, the last batch's projections)."""
    program(params, tangents, batches[0]).wait()
    start = time.perf_counter()
    for batch in batches:
        rows = program(params, tangents, batch)
    out = rows.local()
    return (time.perf_counter() - start) / len(batches), out


def main(argv: list[str]) -> None:
    del argv
    task = mnist.make_task("flax_cnn")
    mesh = make_mesh(1, 1, 1)
    params = task.init_params(jax.random.key(0))
    param_sh = param_shardings(params, mesh, 4096)
    params = jax.device_put(params, param_sh)
    b, k = FLAGS.batch_size, FLAGS.top_k
    split = mnist.load_splits(
        num_train=b * FLAGS.num_batches, num_eval=0, flip_fraction=0.0, seed=0
    )
    inputs = task.model_inputs(read_all(split[0]))
    batches = [
        {n: v[i * b : (i + 1) * b] for n, v in inputs.items()} for i in range(FLAGS.num_batches)
    ]
    rng = np.random.default_rng(0)
    leaves, treedef = jax.tree.flatten(params)
    vectors = [rng.standard_normal((k, *x.shape)).astype(np.float32) for x in leaves]
    norm = np.sqrt(sum((v.reshape(k, -1) ** 2).sum(1) for v in vectors))
    vectors = [v / norm.reshape(-1, *[1] * (v.ndim - 1)) for v in vectors]
    eigvecs = jax.device_put(jax.tree.unflatten(treedef, vectors), stacked_shardings(param_sh))
    common = dict(batch_size=b, memory_budget_mb=0.0)
    device = products.Program(
        task.per_example_loss, param_sh, param_sh, mesh, None, mode="forward", **common
    )
    host_tangents = HostTangents([eigvecs], FLAGS.chunk, param_sh)
    host = streamed_products.StreamedProgram(
        task.per_example_loss, param_sh, param_sh, mesh, None, **common
    )
    seconds, out = {}, {}
    seconds["device"], out["device"] = timed(device, params, eigvecs, batches)
    del eigvecs
    seconds["host"], out["host"] = timed(host, params, host_tangents, batches)
    p = sum(x.size for x in leaves)
    print(
        f"\nFlax CNN, p = {p:,}, p̃ = {k}, batches of {b}; G {k * p * 4 / 2**20:.0f} MiB "
        f"(float32), host chunks of {host_tangents.width} tangents"
    )
    print("| eigenvectors | s / batch | ratio to device | max rel. diff. of g |")
    print("|---|---|---|---|")
    ref = out["device"]
    for where, s in seconds.items():
        diff = np.abs(out[where] - ref).max() / np.abs(ref).max()
        print(f"| {where} | {s:.3f} | {s / seconds['device']:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    app.run(main)
