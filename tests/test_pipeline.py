"""End-to-end runs of the stages on tiny real MNIST: mesh invariance, resumption after SIGKILL,
relative workdirs (the outputs themselves: tests/test_outputs.py)."""

import logging
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from parallel import offload, products
from scoring import tangents
from stages import fit, score, train
from stages.setup import context
from tests.pipeline_helpers import eigvals, results, steps, tiny_config

# End-to-end runs of the jobs: the full suite only (launch/test.sh --fast skips them).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_workdir(runlocal_trained):
    """A workdir holding params trained with the tiny config (shared; copy before mutating)."""
    return runlocal_trained


def _copy_params(source, tmp_path):
    workdir = tmp_path / "work"
    shutil.copytree(source / "params", workdir / "params")
    return workdir


def test_eight_devices_match_one(trained_workdir, tmp_path):
    """The same arnoldi + score on a 4 (data) x 2 (model) mesh of 8 fake devices, with params,
    Krylov basis and eigenvectors sharded over 'model', reproduces the 1-device run: eigenvalues
    to rtol 1e-5, self-influence to the cross-layout tolerance of test_multiprocess.py (on an AMD
    EPYC host 4 of 256 self-influences differed by up to 2e-4 relative: Σ gᵢ²/λᵢ amplifies the
    meshes' different float32 reduction orders through its smallest λ)."""
    found = {}
    for devices, data, model in ((1, -1, 1), (8, 4, 2)):
        config = tiny_config(mesh__num_devices=devices, mesh__data=data, mesh__model=model)
        config.mesh.min_shard_size = 64
        workdir = _copy_params(trained_workdir, tmp_path / f"d{devices}")
        fit.run(config, workdir)
        score.run(config, workdir)
        found[devices] = (eigvals(workdir), pd.read_parquet(results(workdir) / "scores" / "train"))
    np.testing.assert_allclose(found[8][0], found[1][0], rtol=1e-5)
    np.testing.assert_array_equal(found[8][1]["id"], found[1][1]["id"])
    np.testing.assert_allclose(
        found[8][1]["self_influence"], found[1][1]["self_influence"], rtol=1e-4, atol=1e-6
    )


def test_reverse_mode_scores_match_and_resume_forward_parts(trained_workdir, tmp_path, caplog):
    """``score.mode=reverse`` gives the forward mode's scores (rtol 1e-4), and is a compatible
    change: a workdir whose first part was scored in forward mode is finished in reverse, here
    under a memory budget that splits each batch into several calls."""
    config = tiny_config(score__mode="forward")
    forward = _copy_params(trained_workdir, tmp_path / "forward")
    fit.run(config, forward)
    score.run(config, forward)
    want = pd.read_parquet(results(forward) / "scores" / "train").sort_values("id")
    mixed = tmp_path / "mixed"
    shutil.copytree(forward, mixed)
    parts = sorted((results(mixed) / "scores" / "train").glob("part-*.parquet"))
    assert len(parts) == 2
    parts[1].unlink()
    config.score.mode = "reverse"
    config.score.memory_budget_mb = 1
    with caplog.at_level(logging.INFO):
        score.run(config, mixed)
    calls, rows = map(
        int, re.search(r"reverse \((\d+) calls of (\d+) examples", caplog.text).groups()
    )
    assert calls > 1 and calls * rows == config.score.batch_size
    got = pd.read_parquet(results(mixed) / "scores" / "train").sort_values("id")
    np.testing.assert_array_equal(got["id"], want["id"])
    np.testing.assert_allclose(got["self_influence"], want["self_influence"], rtol=1e-4, atol=1e-6)


def test_relative_workdir(tmp_path, monkeypatch):
    """A workdir given relative to the current directory (as in the README's commands) works:
    Orbax itself only accepts absolute paths."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config(train__num_epochs=1, arnoldi__num_iters=4, distill__top_k=2)
    config.arnoldi.checkpoint_every = 2
    train.run(config, "rel/work")
    fit.run(config, "rel/work")
    work = tmp_path / "rel/work"
    assert steps(work / "params") and steps(results(work) / "krylov") == [2, 4]
    assert (results(work) / "fit.json").exists()


def test_eigenvectors_in_host_memory_score_as_on_the_devices(trained_workdir, tmp_path, caplog):
    """G off the devices from the fit to the scores, on 8 fake devices (G sharded over 'model'):
    a basis in host memory under a budget that holds 3 rows of G beside two blocks distills G
    into host memory 3 rows a sweep; ``score.eigvecs_storage=host`` restores G there, cuts it with
    the query gradients and v̄ into chunks of 3 tangents (the last padded) and streams them to
    forward mode; P v̄ streamed over G's chunks; ‖∇ℓ‖² from its own pass. Every column
    (self-influence, the tail's, the queries', the validation influence) matches G on the devices
    from a device basis; and under a budget they would take more than half of, ``auto`` streams."""
    config = tiny_config(
        arnoldi__orthogonalization="bcgs2",
        arnoldi__block_rows=2,
        mesh__num_devices=8,
        mesh__data=4,
        mesh__model=2,
        score__mode="forward",
        score__validation=True,
        score__num_queries=4,
        distill__tail="damping",
    )
    config.mesh.min_shard_size = 64
    device = _copy_params(trained_workdir, tmp_path / "device")
    fit.run(config, device)
    score.run(config, device)
    host = _copy_params(trained_workdir, tmp_path / "host")
    ctx = context(config, host, score.CHECK)
    row = offload.row_bytes(ctx.vectors_like, ctx.vector_sh)[0] / products.MIB
    config.arnoldi.basis_storage, config.arnoldi.memory_budget_mb = "host", (4 + 3.5) * row
    config.score.eigvecs_storage, config.score.tangent_chunk = "host", 3
    with caplog.at_level(logging.INFO):
        fit.run(config, host)
        score.run(config, host)
    assert "G (8 rows) distilled into host memory, 3 rows a sweep" in caplog.text
    assert re.search(r"eigvecs_storage=host: 13 tangents in 5 chunks of 3", caplog.text)
    np.testing.assert_allclose(eigvals(host), eigvals(device), rtol=1e-6)
    for split in ("train", "eval"):
        want = pd.read_parquet(results(device) / "scores" / split).sort_values("id")
        got = pd.read_parquet(results(host) / "scores" / split).sort_values("id")
        assert list(got.columns) == list(want.columns)
        for column in want.columns:
            np.testing.assert_allclose(
                np.stack(got[column]), np.stack(want[column]), rtol=1e-5, atol=1e-6
            )
    config.score.eigvecs_storage, need = "auto", 13 * row
    for budget, where in ((2.01 * need, "device"), (1.99 * need, "host")):
        ctx.config.score.memory_budget_mb = budget
        assert tangents.storage(ctx) == where
