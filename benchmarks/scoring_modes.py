"""The score job's products program in its three modes, side by side on the same weights and examples.

    .venv/bin/python -m benchmarks.scoring_modes [--model=flax_cnn] [--num_examples=4000]

For each p̃ in ``--top_k`` it scores ``--num_examples`` real MNIST examples in batches of
``--batch_size`` with ``parallel.products.Program`` (what ``jobs.score`` runs: compiled for
the job's shapes and sized to ``--memory_budget_mb``) three times: ``score.mode=forward``,
``reverse`` and ``auto``. Each time is wall clock from a fresh program (compiling, and under
auto the probing, included) to the last batch's projections on the host, one batch fetched
while the next runs as in the job. It prints the three times, the plan auto chose and auto's
ratio to the faster of the other two (issue 11's target: <= 1.1), and checks that all three
give the same projections (rtol 1e-4). Weights are the initial ones and the eigenvectors
random: the costs do not depend on their values.
"""

import time

import jax
import numpy as np
from absl import app, flags

from parallel import products, sharding
from parallel.mesh import make_mesh
from tasks import mnist
from tasks.sources import read_all

_MODEL = flags.DEFINE_enum("model", "flax_cnn", ["small_cnn", "flax_cnn"], "MNIST model.")
_NUM = flags.DEFINE_integer("num_examples", 4000, "Examples scored per mode.")
_BATCH = flags.DEFINE_integer("batch_size", 250, "Global batch of one scoring step.")
_TOP_K = flags.DEFINE_list("top_k", ["10", "100"], "Eigenvector counts p̃ to compare at.")
_BUDGET = flags.DEFINE_float(
    "memory_budget_mb", 0.0, "score.memory_budget_mb (0: half the free memory)."
)


def score_all(project: products.Program, params, eigvecs, batches: list[dict]) -> np.ndarray:
    """Every batch's projections on the host, fetching batch i while batch i + 1 runs."""
    out, pending = [], None
    for local in batches:
        current = project(params, eigvecs, local)
        if pending is not None:
            out.append(pending.local())
        pending = current
    out.append(pending.local())
    return np.concatenate(out)


def random_vectors(params, count: int):
    """``count`` random vectors shaped like ``params``, stacked along a leading axis."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(count), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [jax.random.normal(k, (count, *x.shape)) * 1e-3 for k, x in zip(keys, leaves, strict=True)],
    )


def main(argv: list[str]) -> None:
    del argv
    task = mnist.make_task(_MODEL.value)
    mesh = make_mesh(num_devices=1)
    params = task.init_params(jax.random.key(0))
    param_sh = sharding.param_shardings(params, mesh, 2**18)
    params = jax.device_put(params, param_sh)
    n, b = _NUM.value, _BATCH.value
    columns = task.model_inputs(read_all(mnist.load_splits(n, 0, 0.0, 0)[0]))
    batches = [{k: v[i : i + b] for k, v in columns.items()} for i in range(0, n - b + 1, b)]
    print(
        f"jax {jax.__version__}, {jax.default_backend()}, {jax.device_count()} device(s); model "
        f"{_MODEL.value}, {sum(x.size for x in jax.tree.leaves(params)):,} params; "
        f"{len(batches) * b} examples in batches of {b}; budget "
        f"{products.budget_bytes(_BUDGET.value) / products.MIB:,.0f} MiB"
    )
    for top_k in map(int, _TOP_K.value):
        eigvecs = jax.device_put(
            random_vectors(params, top_k), sharding.stacked_shardings(param_sh)
        )
        seconds, results, plans = {}, {}, {}
        for mode in ("forward", "reverse", "auto"):
            project = products.Program(
                task.per_example_loss,
                param_sh,
                param_sh,
                mesh,
                None,
                batch_size=b,
                mode=mode,
                memory_budget_mb=_BUDGET.value,
            )
            start = time.perf_counter()
            results[mode] = score_all(project, params, eigvecs, batches)
            seconds[mode] = time.perf_counter() - start
            plans[mode] = project.plan.describe(top_k)
        for mode in ("reverse", "auto"):
            want = results["forward"]
            np.testing.assert_allclose(
                results[mode], want, rtol=1e-4, atol=1e-5 * np.abs(want).max()
            )
        best = min(("forward", "reverse"), key=seconds.get)
        print(
            f"p̃={top_k}: forward {seconds['forward']:.2f} s [{plans['forward']}], reverse "
            f"{seconds['reverse']:.2f} s [{plans['reverse']}], auto {seconds['auto']:.2f} s "
            f"[{plans['auto']}]; auto / {best} = {seconds['auto'] / seconds[best]:.3f}"
        )


if __name__ == "__main__":
    app.run(main)
