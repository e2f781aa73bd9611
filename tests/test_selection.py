"""Influence over a parameter subset (``config.params``, ``influence/selection.py``): the pipeline's
Arnoldi over the selected leaves equals Arnoldi on a model whose other params are closed over as
constants, the run logs the subset's size, and patterns resolve to whole leaf paths."""

import functools
import logging

import jax
import numpy as np
import pytest

from influence import distill, krylov
from influence.hvp import make_hvp
from influence.selection import Selection, SelectionError
from methods import arnoldi as arnoldi_method
from methods.base import Context
from stages import artifacts, fit, setup, train
from tasks import batching, mnist
from tests.pipeline_helpers import copy_trained, eigvals, tiny_config

# End-to-end runs of the jobs: the full suite only (launch/test.sh --fast skips them).
pytestmark = pytest.mark.slow

SUBSET = "Conv_1/.*|Dense_0/.*"  # the small CNN without its first conv layer


@pytest.fixture(scope="module")
def params_like():
    task = mnist.make_task("small_cnn")
    return jax.eval_shape(task.init_params, jax.random.key(0))


def test_patterns_select_whole_paths(params_like) -> None:
    s = Selection.build(params_like, include="Dense_0/.*|Conv_1/kernel")
    assert s.selected == ("Conv_1/kernel", "Dense_0/bias", "Dense_0/kernel")
    assert not Selection.build(params_like, exclude="Conv_.*").selected[0].startswith("Conv")
    # A partial match is not a match: 'kernel' alone names no whole path.
    with pytest.raises(SelectionError, match=r"select none of the 6 parameter leaves.*Conv_0/bias"):
        Selection.build(params_like, include="kernel")
    with pytest.raises(SelectionError, match="not a valid regular expression"):
        Selection.build(params_like, include="Dense_0/(")
    assert Selection.build(params_like, include=".*").everything
    assert "2,010 of 2,410 parameters (2 of 6 leaves)" in Selection.build(
        params_like, include="Dense_0/.*"
    ).describe(params_like)


def test_select_and_merge_round_trip(params_like) -> None:
    params = mnist.make_task("small_cnn").init_params(jax.random.key(1))
    s = Selection.build(params_like, include=SUBSET)
    sub = s.select(params)
    assert sorted(sub) == ["Conv_1", "Dense_0"]
    doubled = s.merge(params, jax.tree.map(lambda x: 2 * x, sub))
    np.testing.assert_array_equal(doubled["Conv_0"]["kernel"], params["Conv_0"]["kernel"])
    np.testing.assert_array_equal(doubled["Dense_0"]["kernel"], 2 * params["Dense_0"]["kernel"])
    # Shardings and ShapeDtypeStructs select like the params (the basis follows them).
    assert jax.tree.structure(s.select(params_like)) == jax.tree.structure(sub)


def reference_eigvals(ctx: Context, loss, params) -> np.ndarray:
    """Arnoldi on ``loss`` over ``params`` outside the pipeline, with the pipeline's start vector
    and HVP batches (both functions of the config's seeds), then the top-p̃ Ritz values."""
    config, train_split = ctx.config, ctx.split("train")
    a = config.arnoldi

    def get_batch(k: int) -> dict:
        positions = batching.hvp_batch_indices(
            train_split.num_examples, a.hvp_batch_size, a.seed, k, a.fixed_batch
        )
        return ctx.task.model_inputs(train_split.take(positions))

    step = jax.jit(functools.partial(krylov.arnoldi_step, make_hvp(loss, config.l2)))
    state = krylov.init_state(params, a.num_iters, jax.random.key(a.seed))
    result = krylov.run_arnoldi(step, state, params, get_batch, a.num_iters)
    hessenberg = np.asarray(result.state["hessenberg"])
    return distill.ritz_pairs(hessenberg, result.num_completed, config.distill.top_k).eigvals


def test_subset_arnoldi_equals_closed_over_model(tmp_path, caplog, runlocal_trained) -> None:
    """``jobs.arnoldi`` with params.include = SUBSET gives the eigenvalues of Arnoldi run, with
    the same start vector and HVP batches, on a loss whose first conv layer is a constant captured
    in a closure; the log counts only the subset's parameters and bytes."""
    config = tiny_config(params__include=SUBSET)
    copy_trained(runlocal_trained, tmp_path)
    train.run(config, tmp_path)  # finds them: the selection does not change training
    with caplog.at_level(logging.INFO):
        fit.run(config, tmp_path)
    assert "influence over 2,306 of 2,410 parameters (4 of 6 leaves)" in caplog.text
    assert "Krylov basis: 13 vectors x 2306 params in float32, 0.1 MiB" in caplog.text

    ctx = setup.context(config, tmp_path, arnoldi_method.check)
    params = jax.device_get(artifacts.restore_params(ctx)[0])
    conv_0 = params["Conv_0"]

    def closed_over(sub, batch):
        return ctx.task.per_example_loss({"Conv_0": conv_0, **sub}, batch)

    sub = {k: v for k, v in params.items() if k != "Conv_0"}
    want = reference_eigvals(ctx, closed_over, sub)
    np.testing.assert_allclose(eigvals(tmp_path), want, rtol=1e-5)
    # The subset changes the operator: the full model's eigenvalues are others.
    full = reference_eigvals(ctx, ctx.task.per_example_loss, params)
    assert not np.allclose(full, want, rtol=1e-2)
