"""The score job's products program (parallel/products.py): every plan it makes (forward mode in tangent
chunks, reverse mode split into calls, auto's choice) gives the plain forward-mode projections,
under a memory budget, on a mesh of fake CPU devices; and a budget nothing fits is one error."""

import dataclasses
import logging

import jax
import numpy as np
import pytest

from influence import scoring
from parallel import products, sharding
from parallel.mesh import make_mesh
from tasks import mnist
from tasks.sources import read_all

BATCH = 64


def setup(model: str, devices: int, num_vectors: int):
    """(task, mesh, param shardings, params, eigvecs, local batch) on ``devices`` along 'data'."""
    task = mnist.make_task(model)
    mesh = make_mesh(data=devices, model=1, num_devices=devices)
    params = task.init_params(jax.random.key(0))
    param_sh = sharding.param_shardings(params, mesh, 2**18)
    params = jax.device_put(params, param_sh)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    eigvecs = jax.tree.map(
        lambda x: jax.random.normal(next(keys), (num_vectors, *x.shape)) * 1e-2, params
    )
    eigvecs = jax.device_put(eigvecs, sharding.stacked_shardings(param_sh))
    train = read_all(mnist.load_splits(BATCH, 0, 0.0, 0)[0])
    return task, mesh, param_sh, params, eigvecs, task.model_inputs(train)


def program(task, mesh, param_sh, mode: str, budget_mb: float, chunk: int = 0):
    return products.Program(
        task.per_example_loss,
        param_sh,
        param_sh,
        mesh,
        None,
        batch_size=BATCH,
        mode=mode,
        memory_budget_mb=budget_mb,
        tangent_chunk=chunk,
    )


def reference(task, params, eigvecs, local) -> np.ndarray:
    return np.asarray(
        jax.jit(scoring.make_forward_products(task.per_example_loss))(params, eigvecs, local)
    )


def assert_same(got: products.Rows, want: np.ndarray) -> None:
    assert got.all_finite()
    np.testing.assert_allclose(got.local(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def record_compiles(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int | None]]:
    """The (mode, tangent chunk) of every program the projectors compile from now on."""
    compiled: list[tuple[str, int | None]] = []
    compile_ = products.Program._compile

    def recording(self, mode, chunk, *args):
        compiled.append((mode, chunk))
        return compile_(self, mode, chunk, *args)

    monkeypatch.setattr(products.Program, "_compile", recording)
    return compiled


@pytest.mark.slow
def test_auto_times_both_modes_and_keeps_the_first_batch(caplog, monkeypatch) -> None:
    """Under auto the first call times both modes and returns the first batch's projections;
    later calls run the chosen plan; the log names both times and the choice. Forward mode is
    timed on a one-chunk program; its chunked program is compiled only if it was chosen."""
    task, mesh, param_sh, params, eigvecs, local = setup("small_cnn", 8, 12)
    want = reference(task, params, eigvecs, local)
    compiled = record_compiles(monkeypatch)
    project = program(task, mesh, param_sh, "auto", 4096)
    with caplog.at_level(logging.INFO):
        assert_same(project(params, eigvecs, local), want)
    assert project.plan is not None
    line = next(r.getMessage() for r in caplog.records if "score.mode=auto" in r.getMessage())
    assert "auto: reverse (1 call of 64 examples" in line and "; forward (6 of 12 tangents" in line
    assert "one chunk of 6, times 2" in line and line.endswith(f"chose {project.plan.mode}")
    assert sorted(compiled[:2]) == [("forward", None), ("reverse", None)]
    assert compiled[2:] == ([("forward", 6)] if project.plan.mode == "forward" else [])
    assert_same(project(params, eigvecs, local), want)


@pytest.mark.slow
def test_auto_compiles_the_chunked_forward_program_when_forward_scores(caplog, monkeypatch) -> None:
    """When forward mode is what auto runs (here: the only mode that fits, reverse made to need
    a terabyte), the chunked program is compiled from the probe's chunk and scores every batch,
    the first one included."""
    task, mesh, param_sh, params, eigvecs, local = setup("small_cnn", 4, 12)
    want = reference(task, params, eigvecs, local)
    fit_reverse = products.Program._fit_reverse
    monkeypatch.setattr(
        products.Program,
        "_fit_reverse",
        lambda self, *args: dataclasses.replace(fit_reverse(self, *args), working_bytes=2**40),
    )
    compiled = record_compiles(monkeypatch)
    project = program(task, mesh, param_sh, "auto", 4096)
    with caplog.at_level(logging.INFO):
        assert_same(project(params, eigvecs, local), want)
    assert project.plan.mode == "forward" and project.plan.tangent_chunk == 6
    assert sorted(compiled[:2]) == [("forward", None), ("reverse", None)]
    assert compiled[2:] == [("forward", 6)]
    assert any("the only mode that fits" in r.getMessage() for r in caplog.records)
    assert_same(project(params, eigvecs, local), want)


@pytest.mark.slow
def test_budget_splits_reverse_into_calls_of_whole_device_rows() -> None:
    """A budget below one call's working memory splits each batch into calls whose rows are a
    multiple of the 'data' axis (4 devices); the rows come back in order."""
    task, mesh, param_sh, params, eigvecs, local = setup("small_cnn", 4, 6)
    want = reference(task, params, eigvecs, local)
    whole = program(task, mesh, param_sh, "reverse", 4096)
    assert_same(whole(params, eigvecs, local), want)
    assert whole.plan.calls == 1
    working_mb = whole.plan.working_bytes / products.MIB
    split = program(task, mesh, param_sh, "reverse", working_mb / 3)
    assert_same(split(params, eigvecs, local), want)
    assert split.plan.calls > 1 and split.plan.rows % 4 == 0
    assert split.plan.working_bytes <= working_mb / 3 * products.MIB


@pytest.mark.slow
def test_budget_chunks_forward_tangents() -> None:
    """Forward mode starts from equal chunks of at most 8 tangents (16: 8 + 8) and halves them to
    fit the budget; a configured ``score.tangent_chunk`` is kept as given."""
    task, mesh, param_sh, params, eigvecs, local = setup("small_cnn", 1, 16)
    want = reference(task, params, eigvecs, local)
    roomy = program(task, mesh, param_sh, "forward", 4096)
    assert_same(roomy(params, eigvecs, local), want)
    assert roomy.plan.tangent_chunk == products.FORWARD_CHUNK_CAP
    working_mb = roomy.plan.working_bytes / products.MIB
    tight = program(task, mesh, param_sh, "forward", working_mb / 3)
    assert_same(tight(params, eigvecs, local), want)
    assert tight.plan.tangent_chunk < products.FORWARD_CHUNK_CAP
    given = program(task, mesh, param_sh, "forward", 4096, chunk=5)
    assert_same(given(params, eigvecs, local), want)
    assert given.plan.tangent_chunk == 5


@pytest.mark.slow
def test_nothing_fitting_the_budget_is_one_error() -> None:
    """The Flax CNN's per-example gradients (3.3 MB each) and one tangent's activations over 64
    examples both exceed 1 MiB: the error names both needs and the two fixes."""
    task, mesh, param_sh, params, eigvecs, local = setup("flax_cnn", 1, 4)
    with pytest.raises(products.MemoryBudgetError) as error:
        program(task, mesh, param_sh, "auto", 1)(params, eigvecs, local)
    message = str(error.value)
    assert "\n" not in message and "memory budget of 1 MiB per device" in message
    assert "forward (1 of 4 tangents" in message and "reverse (64 calls of 1 examples" in message
    assert "lower score.batch_size or raise score.memory_budget_mb" in message
