"""End-to-end runs of the stages on tiny real MNIST: mesh invariance, resumption after SIGKILL,
relative workdirs (the outputs themselves: tests/test_outputs.py)."""

import logging
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from stages import fit, score, train
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
