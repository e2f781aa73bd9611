"""The baselines behind the method interface (methods/), each against its explicit formula on the
small CNN (2,410 params) of the runlocal preset: an explicit Hessian from ``jax.hessian``
(independent of the HVPs), per-example gradients, numpy's inverse and eigh."""

import json
import logging
import shutil
import types
import unittest.mock

import jax
import numpy as np
import pandas as pd
import pytest
from jax.flatten_util import ravel_pytree

from checkpoints.checkpointer import IncompatibleCheckpointError
from influence import scoring, subspace
from parallel import operator_products
from runtime.errors import InputError
from scoring import queries
from stages import artifacts, evaluate, fit, score, train
from stages.setup import context
from tests.pipeline_helpers import copy_trained, override, run_job, tiny_config
from tests.test_arnoldi import explicit_hessian

# End-to-end runs of the jobs: the full suite only (launch/test.sh --fast skips them).
pytestmark = pytest.mark.slow

DAMPING = 1.0  # above |λ_min| of the runlocal params (2 epochs: not at a minimum)


def method_config(name: str, **overrides: object):
    """The tiny config with every HVP on all 256 training examples, so the restricted
    Hessians are of the same H as the explicit one."""
    config = tiny_config(
        arnoldi__hvp_batch_size=256, arnoldi__fixed_batch=True, distill__damping=DAMPING
    )
    config.method.name = name
    return override(config, **overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, runlocal_trained):
    """The workdir with trained params, their explicit H over the training split (flat), the
    flat per-example gradients of the train and eval splits with their ids, p and the params'
    shapes."""
    workdir = copy_trained(runlocal_trained, tmp_path_factory.mktemp("methods"))
    config = method_config("arnoldi")
    train.run(config, workdir)  # finds them
    ctx = context(config, workdir, fit.CHECK)
    params, ctx = artifacts.restore_params(ctx)
    params = jax.device_get(params)
    grads, batches = {}, {}
    for name in ("train", "eval"):
        split = ctx.split(name)
        columns = split.take(np.arange(split.num_examples))
        batches[name] = {k: np.asarray(v) for k, v in ctx.task.model_inputs(columns).items()}
        g = scoring.example_grads(ctx.task.per_example_loss, params, batches[name])
        grads[name] = (columns["id"], np.asarray(subspace.flatten_rows(g), np.float64))
    hessian = explicit_hessian(ctx.task.per_example_loss, config.l2, params, batches["train"], 8)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return types.SimpleNamespace(
        workdir=workdir, hessian=hessian, grads=grads, p=ravel_pytree(params)[0].size, like=like
    )


def _run(config, reference, tmp_path):
    workdir = tmp_path / config.method.name
    shutil.copytree(reference.workdir / "params", workdir / "params")
    shutil.copy(reference.workdir / "corrupted.parquet", workdir / "corrupted.parquet")
    fit.run(config, workdir)
    score.run(config, workdir)
    return workdir / "methods" / config.method.name


def _self_influence(directory, ids):
    table = pd.read_parquet(directory / "scores" / "train").set_index("id")
    return table.loc[ids, "self_influence"].to_numpy(np.float64)


def test_exact_is_numpy_eigh_and_the_damped_inverse(reference, tmp_path):
    hessian, grads, p = reference.hessian, reference.grads, reference.p
    directory = _run(method_config("exact"), reference, tmp_path)
    eig = json.loads((directory / "fit.json").read_text())
    got = np.sort(np.asarray(eig["eigvals"]))
    want = np.linalg.eigvalsh(hessian)
    assert got.size == p == 2410
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    ids, g = grads["train"]
    inverse = np.linalg.inv(hessian + DAMPING * np.eye(p))
    expected = np.einsum("np,pq,nq->n", g, inverse, g)
    np.testing.assert_allclose(_self_influence(directory, ids), expected, rtol=2e-3)
    metrics = evaluate.run(method_config("exact"), directory.parents[1])
    assert metrics["method"] == "exact" and metrics["top_k"] == p
    assert (directory / "metrics.json").exists()


@pytest.mark.parametrize("name", ["randproj", "randselect"])
def test_random_subspaces_are_the_sketched_inverse(reference, tmp_path, name):
    """Self-influence ∇ℓᵀ Gᵀ(G H Gᵀ)⁻¹G ∇ℓ with the raw G the method drew (Gaussian, or
    coordinate rows), not orthonormalised: the eigenpairs it saved span the same space."""
    hessian, grads, p = reference.hessian, reference.grads, reference.p
    config = method_config(name, distill__top_k=8, method__seed=3)
    directory = _run(config, reference, tmp_path)
    if name == "randproj":
        rows = subspace.gaussian_rows(jax.random.key(3), reference.like, 8)
        g_raw = np.asarray(subspace.flatten_rows(rows), np.float64)
        assert abs(np.mean(np.sum(g_raw**2, axis=0)) - 1) < 0.05  # E[GᵀG] = I: diag ≈ 1
    else:
        picked = np.sort(np.random.default_rng(3).choice(p, 8, replace=False))
        g_raw = np.eye(p)[picked]
    sketched = g_raw @ hessian @ g_raw.T
    ids, g = grads["train"]
    projected = g @ g_raw.T
    expected = np.einsum(
        "nk,kl,nl->n", projected, np.linalg.inv(sketched + DAMPING * g_raw @ g_raw.T), projected
    )
    np.testing.assert_allclose(_self_influence(directory, ids), expected, rtol=2e-3, atol=1e-7)
    # Its eigenvalues: the Ritz values of H on span(G), the generalised eigenvalues of
    # (G H Gᵀ, G Gᵀ).
    chol = np.linalg.cholesky(g_raw @ g_raw.T)
    inv = np.linalg.inv(chol)
    ritz = np.linalg.eigvalsh(inv @ sketched @ inv.T)
    eig = np.sort(json.loads((directory / "fit.json").read_text())["eigvals"])
    np.testing.assert_allclose(eig, ritz, rtol=1e-3, atol=1e-5)


def test_graddot_is_the_gradient_inner_product(reference, tmp_path):
    grads = reference.grads
    config = method_config("graddot", distill__damping=0.0)
    directory = _run(config, reference, tmp_path)
    ids, g = grads["train"]
    np.testing.assert_allclose(_self_influence(directory, ids), np.sum(g**2, axis=1), rtol=1e-4)
    query_ids, q = grads["eval"]
    top = pd.read_parquet(directory / "scores" / "influence_topk.parquet")
    assert set(top["query_id"]) == set(query_ids[: config.score.num_queries])
    row = {i: k for k, i in enumerate(ids)}
    col = {i: k for k, i in enumerate(query_ids)}
    expected = [
        g[row[t]] @ q[col[z]] for t, z in zip(top["train_id"], top["query_id"], strict=True)
    ]
    np.testing.assert_allclose(top["influence"], expected, rtol=1e-4, atol=1e-7)
    best = top[(top["kind"] == "proponent") & (top["rank"] == 0)]
    for z, t in zip(best["query_id"], best["train_id"], strict=True):
        assert t == ids[np.argmax(g @ q[col[z]])]


def test_unknown_method_and_exact_on_a_large_model_stop_before_training(tmp_path):
    for flags, message in (
        (["--config.method.name=lisa"], "config.method.name='lisa' is not a method"),
        (
            ["--config.method.name=exact", "--config.method.max_params=1000"],
            "method.name=exact needs the explicit 2410 × 2410 Hessian",
        ),
    ):
        workdir = tmp_path / flags[-1].split("=")[-1]
        done = run_job("pipeline", workdir, *flags)
        assert done.returncode == 2, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, last
        assert not (workdir / "params").exists()


def test_tracin_sums_gradient_products_over_the_kept_epochs(reference, tmp_path):
    """Σ_c η_c ‖∇ℓ_c(x)‖² over the params the train job kept after epochs 1 and 2, from
    per-example gradients at each; and a workdir trained without them is refused in one line."""
    config = method_config("tracin", distill__damping=0.0, train__keep_epochs=(1, 2))
    workdir = tmp_path / "tracin"
    train.run(config, workdir)
    fit.run(config, workdir)
    score.run(config, workdir)
    ctx = context(config, workdir, fit.CHECK)
    kept = artifacts.restore_epoch_params(ctx)
    assert [rate for _, rate in kept] == [config.train.learning_rate] * 2
    split = ctx.split("train")
    columns = split.take(np.arange(split.num_examples))
    inputs = {k: np.asarray(v) for k, v in ctx.task.model_inputs(columns).items()}
    expected = 0.0
    for params, rate in kept:
        g = scoring.example_grads(ctx.task.per_example_loss, jax.device_get(params), inputs)
        expected = expected + rate * np.sum(np.asarray(subspace.flatten_rows(g)) ** 2, axis=1)
    got = _self_influence(workdir / "methods" / "tracin", columns["id"])
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # The final epoch's params are the trained params: its term is graddot's.
    final = _self_influence(_run(method_config("graddot"), reference, tmp_path), columns["id"])
    assert not np.allclose(got, config.train.learning_rate * final)

    untracked = tmp_path / "untracked"
    shutil.copytree(reference.workdir / "params", untracked / "params")
    with pytest.raises(InputError, match=r"no params kept after epochs \[1, 2\]"):
        score.run(config, untracked)


@pytest.mark.parametrize("name", ["lissa", "cg"])
def test_solvers_converge_to_the_damped_inverse(reference, name):
    """The query solves of lissa (full-batch steps, s = 1.05 (λ_max + λ)) and cg against numpy's
    (H + λI)⁻¹∇ℓ(z) to 1e-3 relative (measured: lissa 6.3e-4 at depth 40, 3.5e-7 at depth 100;
    cg 7.4e-6)."""
    eigvals = np.linalg.eigvalsh(reference.hessian)
    config = method_config(
        name,
        method__damping=DAMPING,
        method__hvp_batch_size=256,
        method__depth=50,
        method__scale=float(1.05 * (eigvals.max() + DAMPING)),
        method__tol=1e-5,
    )
    ctx = context(config, reference.workdir, fit.CHECK)
    params, ctx = artifacts.restore_params(ctx)
    grads = queries.query_gradients(ctx, params, 8)
    solved = ctx.method.operator(ctx, params, None).solve(grads)
    got = np.asarray(subspace.flatten_rows(solved), np.float64)
    q = np.asarray(subspace.flatten_rows(grads), np.float64)
    want = np.linalg.solve(reference.hessian + DAMPING * np.eye(reference.p), q.T).T
    assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want)


def test_cg_scores_are_the_damped_inverse_products(reference, tmp_path, caplog):
    """cg through the score job, its intended use (train → test, no per-example solves): each
    traced query's influences ⟨∇ℓ(x), (H + λI)⁻¹∇ℓ(z)⟩ and the validation influence
    ⟨∇ℓ(x), (H + λI)⁻¹v̄⟩ against numpy, jobs.evaluate ranking by the harm; the time estimate of
    the first batches is logged (a warning above the threshold). The self-influence route of the
    operator scorer is the hyperinf and datainf tests' (tests/test_lora_text.py)."""
    config = method_config(
        "cg",
        method__damping=DAMPING,
        method__tol=1e-6,
        method__hvp_batch_size=256,
        score__validation=True,
        score__self_influence=False,
    )
    caplog.set_level(logging.INFO)
    with unittest.mock.patch.object(operator_products, "SLOW_SECONDS", 0.0):
        directory = _run(config, reference, tmp_path)
    slow = [r for r in caplog.records if "for the first batch of" in r.getMessage()]
    assert slow and slow[0].levelno == logging.WARNING, [r.getMessage() for r in caplog.records]
    inverse = np.linalg.inv(reference.hessian + DAMPING * np.eye(reference.p))
    ids, g = reference.grads["train"]
    query_ids, q = reference.grads["eval"]
    table = pd.read_parquet(directory / "scores" / "train").set_index("id").loc[ids]
    assert "self_influence" not in table.columns
    np.testing.assert_allclose(
        table["validation_influence"], g @ inverse @ q.mean(axis=0), rtol=1e-3, atol=1e-6
    )
    top = pd.read_parquet(directory / "scores" / "influence_topk.parquet")
    row = {i: k for k, i in enumerate(ids)}
    col = {i: k for k, i in enumerate(query_ids)}
    expected = [
        g[row[t]] @ inverse @ q[col[z]]
        for t, z in zip(top["train_id"], top["query_id"], strict=True)
    ]
    np.testing.assert_allclose(top["influence"], expected, rtol=1e-3, atol=1e-6)
    metrics = evaluate.run(config, directory.parents[1])
    assert metrics["ranked_by"] == "validation_influence" and "auc_validation" not in metrics
    # Scores without self-influence are not taken for scores with it.
    with pytest.raises(IncompatibleCheckpointError, match=r"score\.self_influence=False"):
        score.run(override(config, score__self_influence=True), directory.parents[1])


def test_lissa_refuses_a_damping_below_the_negative_curvature(reference, tmp_path):
    """The runlocal params are a saddle (λ_min ≈ −0.40): LiSSA with λ = 1e-3 would diverge,
    which Lanczos finds before any solve, in one line naming the fix."""
    config = method_config("lissa", method__damping=1e-3)
    ctx = context(config, reference.workdir, fit.CHECK)
    params, ctx = artifacts.restore_params(ctx)
    with pytest.raises(InputError, match=r"LiSSA diverges; set method.damping above 0\.[3-9]"):
        ctx.method.operator(ctx, params, None)
    # Through the score job: nothing is saved, so the same workdir takes the fixed damping.
    workdir = tmp_path / "lissa"
    shutil.copytree(reference.workdir / "params", workdir / "params")
    with pytest.raises(InputError, match="LiSSA diverges"):
        score.run(config, workdir)
    assert not (workdir / "methods" / "lissa" / "scores" / "meta.json").exists()


@pytest.mark.parametrize("name", ["hyperinf", "datainf", "ekfac"])
def test_layerwise_methods_on_four_devices_match_one(reference, tmp_path, name):
    """The data-parallel statistics pass (per-device sums, one all-reduce per leaf) and the
    operator scorer (each device its own rows) give one device's scores on a 'data' axis of 4;
    over the dense layer only (a conv kernel is refused in one line, before any work). The
    float32 sums differ in order between the two, and EK-FAC's eigenbasis of near-degenerate
    factor eigenvalues turns with them: its validation influences (up to ~16) moved by up to
    7.7e-6, so the absolute tolerance is relative to each column's largest value."""
    with pytest.raises(InputError, match=r"Conv_0/kernel has shape \(5, 5, 1, 4\)"):
        context(method_config(name), reference.workdir, fit.CHECK)
    tables = []
    for devices in (1, 4):
        config = method_config(
            name, params__include="Dense_0/.*", mesh__num_devices=devices, score__validation=True
        )
        directory = _run(config, reference, tmp_path / f"devices{devices}")
        tables.append(pd.read_parquet(directory / "scores" / "train").set_index("id").sort_index())
    for column in ("self_influence", "validation_influence"):
        want = tables[0][column]
        np.testing.assert_allclose(
            tables[1][column], want, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(want).max())
        )
