r"""Linear datamodeling score (LDS; Park et al. 2023, TRAK) of every method a report ran.

    .venv/bin/python -m benchmarks.lds --config=configs/mnist.py --report=W [--num_models=32]

``--report`` is a workdir where ``jobs.report`` finished with the same ``--config`` (and
overrides), with ``score.num_queries`` ≥ ``--num_test`` so that the methods scored by gradient
products (graddot, tracin) have them for every test example. M models are trained with the same
recipe on random α-subsets S_m of the training split (``filter.by=random``, ``filter.keep=α``,
``filter.seed=m``: ``jobs.train`` as a user runs it, in-process, cached in ``--out``); for each of
the first T evaluation examples z the loss each model reaches, L_m(z), is held against the
prediction −Σ_{x∈S_m} I(x, z) of each method's influence (from its saved projections: the
train → test formula of the score job), and LDS is the Spearman correlation over m, averaged
over z. Prints a table and writes ``<out>/lds.json``.
"""

import json
import time

import jax
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags
from scipy import stats

from influence import scoring
from methods import registry
from runtime import outputs
from runtime import workdir as wd
from scoring import row_layout
from stages import artifacts, setup, train
from tasks import filtering

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mnist.py", "Config file[:presets].")
_REPORT = flags.DEFINE_string("report", None, "Workdir of a finished jobs.report of --config.")
_NUM_MODELS = flags.DEFINE_integer("num_models", 32, "M, models trained on random subsets.")
_ALPHA = flags.DEFINE_float("alpha", 0.5, "α, the fraction of the training split each keeps.")
_NUM_TEST = flags.DEFINE_integer("num_test", 100, "T, evaluation examples (the first T).")
_OUT = flags.DEFINE_string("out", None, "Where the subset models go (default <report>/lds).")


def subset_losses(
    config, out: epath.Path, n: int, m: int, num_test: int
) -> tuple[np.ndarray, np.ndarray]:
    """(the training positions model m kept, its losses on the first ``num_test`` eval
    examples); trained with the report's recipe on filter.seed=m (reused when already there)."""
    sub = config.copy_and_resolve_references()
    sub.filter.by, sub.filter.keep, sub.filter.seed = filtering.RANDOM, _ALPHA.value, m
    workdir = out / f"subset-{m:03d}"
    train.run(sub, workdir)
    params, ctx = artifacts.restore_params(setup.context(sub, workdir, train.CHECK))
    evaluation = ctx.split("eval")
    inputs = ctx.task.model_inputs(evaluation.take(np.arange(num_test)))
    losses = jax.jit(ctx.task.per_example_loss)(jax.device_get(params), inputs)
    return filtering.random_subset(n, round(_ALPHA.value * n), m), np.asarray(losses, np.float64)


def influences(directory: epath.Path, config, num_test: int) -> np.ndarray:
    """(N, T) influence of every training example (in position order) on the first T eval
    examples, from a run's saved projections, as the score job's train → test computes it."""
    scores = wd.results(directory, registry.of(config).name) / wd.SCORES
    meta = outputs.read_json(scores / "meta.json")
    eigvals = np.asarray(meta["eigvals"], np.float32)
    sigma, intrinsic = meta.get("tail_sigma"), meta.get("intrinsic_sigma", False)
    train_parts = outputs.read_parquet_dir(scores / "train")
    g_train = row_layout.projections(train_parts)
    g_test = row_layout.projections(outputs.read_parquet_dir(scores / "eval"))[:num_test]
    if intrinsic:  # graddot, tracin: the gradient products the score job saved
        dots = row_layout.projections(train_parts, "query_dots")
        if dots.shape[1] < num_test:
            raise SystemExit(
                f"{scores}: {dots.shape[1]} queries scored, fewer than --num_test={num_test}; "
                f"run the report with --config.score.num_queries={num_test}"
            )
        return np.asarray(
            scoring.influence(g_train, g_test[:, :0], eigvals, dots[:, :num_test], sigma)
        )
    return np.asarray(scoring.influence(g_train, g_test, eigvals))


def lds(kept: list[np.ndarray], losses: np.ndarray, influence: np.ndarray) -> float:
    """Mean over test examples of Spearman(−Σ_{x∈S_m} I(x, z), L_m(z)) over the models m."""
    masks = np.zeros((len(kept), influence.shape[0]))
    for m, positions in enumerate(kept):
        masks[m, positions] = 1.0
    predicted = -masks @ influence
    rhos = [
        stats.spearmanr(predicted[:, z], losses[:, z]).statistic for z in range(losses.shape[1])
    ]
    return float(np.nanmean(rhos))


def main(argv: list[str]) -> None:
    del argv
    config, report = _CONFIG.value, epath.Path(_REPORT.value)
    out = epath.Path(_OUT.value) if _OUT.value else report / "lds"
    rows = outputs.read_json(report / "report.json")["rows"]
    start = time.perf_counter()
    n = setup.context(config, report, train.CHECK).split("train").num_examples
    trained = [subset_losses(config, out, n, m, _NUM_TEST.value) for m in range(_NUM_MODELS.value)]
    kept, losses = [k for k, _ in trained], np.stack([loss for _, loss in trained])
    train_s = time.perf_counter() - start
    result = {"num_models": _NUM_MODELS.value, "alpha": _ALPHA.value, "num_test": _NUM_TEST.value}
    result["train_s"], result["lds"] = train_s, {}
    print(f"{_NUM_MODELS.value} models on random {_ALPHA.value:.0%} subsets: {train_s:.0f} s")
    print(f"{'method':<16} {'p̃':>5} {'LDS':>7}")
    for row in rows:
        sub = config.copy_and_resolve_references()
        sub.method.name = row["method"]
        value = lds(
            kept, losses, influences(report / "report" / row["label"], sub, _NUM_TEST.value)
        )
        result["lds"][row["label"]] = value
        print(f"{row['method']:<16} {row['top_k']:>5} {value:>7.3f}")
    outputs.write_json(out / "lds.json", result)
    print(json.dumps(result["lds"]))


if __name__ == "__main__":
    flags.mark_flag_as_required("report")
    app.run(main)
