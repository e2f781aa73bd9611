"""The LoRA text task (tasks/lora_text.py, configs/lora_text.py) and the per-layer methods
(methods/hyperinf.py, methods/datainf.py) on its runlocal preset: 2 pretrained MiniLM layers, LoRA
on query and value, 256 Rotten Tomatoes snippets with 20% of the labels flipped.

HyperINF's and DataInf's scores are held against their formulas computed here in float64 from
per-example gradients of the adapters (``jax.grad`` per example, nothing of the methods' code),
and each real GFIM's Schulz inverse against numpy's inverse of the damped matrix."""

import json
import logging
import shutil

import jax
import numpy as np
import pandas as pd
import pytest

from configs import lora_text
from influence import scoring
from runtime.errors import InputError
from stages import artifacts, evaluate, fit, score, train
from stages.setup import context
from tests.pipeline_helpers import copy_trained, override, run_job

# End-to-end runs of the jobs: the full suite only (launch/test.sh --fast skips them).
pytestmark = pytest.mark.slow

CONFIG = "configs/lora_text.py:runlocal"


def _config(method: str = "hyperinf", **overrides: object):
    config = lora_text.get_config(f"runlocal,method={method}")
    config.log_every_secs = 1000.0
    config.mesh.num_devices = 1  # the conftest's 8 fake devices share 2 cores
    return override(config, **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """Trained params of the runlocal preset, and the adapters' per-example gradients (float64,
    flattened per leaf, in position order) on the training and eval splits."""
    workdir = tmp_path_factory.mktemp("lora_text")
    config = _config()
    train.run(config, workdir)
    ctx = context(config, workdir, fit.CHECK)
    params, ctx = artifacts.restore_params(ctx)
    grads, ids = {}, {}
    for name in ("train", "eval"):
        split = ctx.split(name)
        columns = split.take(np.arange(split.num_examples))
        inputs = ctx.task.model_inputs(columns)
        per_example = jax.jit(
            lambda p, b: scoring.example_grads(ctx.task.per_example_loss, p, b, ctx.selection)
        )(params, inputs)
        grads[name] = [
            np.asarray(g, np.float64).reshape(g.shape[0], -1) for g in jax.tree.leaves(per_example)
        ]
        ids[name] = columns["id"]
    shapes = [x.shape for x in jax.tree.leaves(ctx.vectors_like)]
    return workdir, grads, ids, shapes


def _scores(config, trained, tmp_path):
    workdir = tmp_path / config.method.name
    shutil.copytree(trained[0] / "params", workdir / "params")
    shutil.copy(trained[0] / "corrupted.parquet", workdir / "corrupted.parquet")
    fit.run(config, workdir)
    score.run(config, workdir)
    table = pd.read_parquet(workdir / "methods" / config.method.name / "scores" / "train")
    return workdir, table.set_index("id").loc[trained[2]["train"]]


def _rows(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(n, r, d) rows of each example's gradient of a leaf (d the larger side)."""
    g = flat.reshape(-1, *shape)
    if len(shape) == 1:
        return g[:, None, :]
    return g if shape[1] >= shape[0] else np.swapaxes(g, 1, 2)


def test_hyperinf_is_the_damped_gfim_inverse_per_layer(trained, tmp_path, caplog):
    """Self-influence Σ_l ⟨G_l X_l, G_l⟩ and validation influence Σ_l ⟨v̄_l X_l, G_l⟩ with X_l the
    inverse of the GFIM (1/N) Σ G_iᵀG_i + λ_l I of each LoRA factor; each saved Schulz inverse
    against numpy's inverse of the saved damped GFIM (≤ 1e-4 relative), with its iterations."""
    _, grads, _, shapes = trained
    config = _config("hyperinf")
    workdir, table = _scores(config, trained, tmp_path)
    m = config.method
    self_influence = np.zeros(len(table))
    validation = np.zeros(len(table))
    for g, v, shape in zip(grads["train"], grads["eval"], shapes, strict=True):
        rows = _rows(g, shape)
        a = np.einsum("nrd,nre->de", rows, rows) / rows.shape[0]
        lam = m.damping_ratio * np.mean(rows**2) + m.damping + config.l2
        inverse = np.linalg.inv(a + lam * np.eye(a.shape[0]))
        self_influence += np.einsum("nrd,de,nre->n", rows, inverse, rows)
        mean = _rows(v, shape).mean(axis=0)
        validation += np.einsum("rd,de,nre->n", mean, inverse, rows)
    np.testing.assert_allclose(table["self_influence"], self_influence, rtol=2e-3)
    np.testing.assert_allclose(
        table["validation_influence"],
        validation,
        rtol=2e-3,
        atol=2e-3 * np.abs(validation).max(),
    )
    eig = json.loads((workdir / "methods" / "hyperinf" / "fit.json").read_text())
    assert len(eig["layers"]) == len(shapes) and eig["converged"]
    ctx = context(config, workdir, fit.CHECK)
    state, _ = artifacts.restore_fitted(artifacts.restore_params(ctx)[1])
    for a, x, layer in zip(
        jax.tree.leaves(state["operator"]["damped_gfim"]),
        jax.tree.leaves(state["operator"]["inverse"]),
        eig["layers"],
        strict=True,
    ):
        want = np.linalg.inv(np.asarray(a, np.float64))
        error = np.linalg.norm(np.asarray(x, np.float64) - want) / np.linalg.norm(want)
        assert error <= 1e-4, (layer, error)
        assert 1 <= layer["iterations"] <= m.max_iters and layer["residual"] <= m.tol
    # Too few iterations: a warning naming the residual, and the summary says so.
    short = _config("hyperinf", method__max_iters=2)
    caplog.set_level(logging.WARNING)
    shutil.copytree(trained[0] / "params", tmp_path / "short" / "params")
    fit.run(short, tmp_path / "short")
    warned = [r.getMessage() for r in caplog.records if "Schulz stopped" in r.getMessage()]
    assert warned and "after 2 iterations" in warned[0], warned
    summary = json.loads((tmp_path / "short" / "methods" / "hyperinf" / "fit.json").read_text())
    assert not summary["converged"]


def test_datainf_is_the_sherman_morrison_average(trained, tmp_path):
    """Per layer P v = (v − (1/N) Σ_j g_j ⟨g_j, v⟩ / (λ + ‖g_j‖²)) / λ: self-influence Σ_l
    ⟨g_l, P g_l⟩ and the validation influence Σ_l ⟨g_l, P v̄_l⟩, against numpy."""
    _, grads, _, _ = trained
    config = _config("datainf")
    _, table = _scores(config, trained, tmp_path)
    m = config.method
    self_influence = np.zeros(len(table))
    validation = np.zeros(len(table))
    for g, v in zip(grads["train"], grads["eval"], strict=True):
        lam = m.damping_ratio * np.mean(g**2) + m.damping + config.l2
        weights = 1.0 / (lam + np.sum(g**2, axis=1))

        def apply(x: np.ndarray, g=g, lam=lam, weights=weights) -> np.ndarray:
            return (x - ((x @ g.T) * weights) @ g / g.shape[0]) / lam

        self_influence += np.sum(g * apply(g), axis=1)
        validation += g @ apply(v.mean(axis=0))
    np.testing.assert_allclose(table["self_influence"], self_influence, rtol=2e-3)
    np.testing.assert_allclose(
        table["validation_influence"], validation, rtol=2e-3, atol=2e-3 * np.abs(validation).max()
    )


def test_runlocal_pipeline_writes_auc_and_ap(trained, tmp_path):
    """``python -m jobs.pipeline --config=configs/lora_text.py:runlocal`` (the config's docstring
    command) end to end, on the params the module trained (its train stage finds them):
    metrics.json with AUC and AP of the flipped labels by self-influence and by harm to the
    validation loss."""
    copy_trained(trained[0], tmp_path)
    done = run_job("pipeline", tmp_path, config=CONFIG)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "methods" / "hyperinf" / "metrics.json").read_text())
    assert {"auc", "ap", "auc_validation", "ap_validation"} <= set(metrics)
    assert metrics["num_flipped"] == round(0.2 * 256) and metrics["method"] == "hyperinf"


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--config.lora.rank=500", "LoRA rank=500 exceeds min(d_in, d_out)=384 of layer_"),
        ("--config.lora.targets=layer_0/attention/qkv", "match no Dense layer's path"),
        ("--config.method.max_layer_params=100", "needs a 384 × 384 matrix, more than"),
    ],
)
def test_bad_input_is_one_line_before_training(tmp_path, flag, message):
    done = run_job("pipeline", tmp_path, flag, config=CONFIG)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert not (tmp_path / "params").exists()


def test_evaluate_needs_a_ranking(trained, tmp_path):
    """Without self-influence and without the validation protocol there is nothing to rank."""
    config = _config("hyperinf", score__self_influence=False, score__validation=False)
    workdir, _ = _scores(config, trained, tmp_path)
    with pytest.raises(InputError, match="neither self_influence nor validation_influence"):
        evaluate.run(config, workdir)
