"""Bad input ends in one clear line before any expensive work, and nothing saved is touched."""

import shutil

import pytest

from checkpoints.checkpointer import CheckpointError
from pipeline import arnoldi, score, train
from pipeline.errors import InputError
from tests.pipeline_helpers import run_job, tiny_config


def _one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in result.stderr
    return last


def test_unknown_config_key_is_one_line(tmp_path):
    last = _one_line_error(run_job("arnoldi", tmp_path, "--config.arnoldi.nm_iters=3"))
    assert "unknown config field" in last and "num_iters" in last
    assert not any(tmp_path.iterdir())


def test_unknown_preset_is_one_line(tmp_path):
    result = run_job("train", tmp_path, "--config=configs/mnist.py:runlocl")
    assert "unknown config preset 'runlocl'" in _one_line_error(result)


def test_missing_params_checkpoint(tmp_path):
    result = run_job("arnoldi", tmp_path)
    assert "no trained params" in _one_line_error(result) and "jobs.train" in result.stderr
    assert not (tmp_path / "params").exists() and not (tmp_path / "krylov").exists()
    with pytest.raises(InputError, match="no trained params"):
        arnoldi.run(tiny_config(), tmp_path)


def test_top_k_above_num_iters(tmp_path):
    with pytest.raises(
        InputError, match=r"distill.top_k=13 must be between 1 and arnoldi.num_iters=12"
    ):
        arnoldi.run(tiny_config(distill__top_k=13), tmp_path)
    assert not any(tmp_path.iterdir())


def test_batch_not_divisible_by_data_axis(tmp_path):
    config = tiny_config(mesh__num_devices=8, mesh__data=8, arnoldi__hvp_batch_size=60)
    with pytest.raises(
        InputError, match=r"arnoldi.hvp_batch_size=60 .* 8 devices on the 'data' axis"
    ):
        arnoldi.run(config, tmp_path)
    with pytest.raises(InputError, match=r"train.batch_size=60"):
        train.run(tiny_config(mesh__num_devices=8, train__batch_size=60), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def krylov_workdir(tmp_path_factory: pytest.TempPathFactory):
    """Params and a Krylov state, as if killed after the last Krylov save (no eigenpairs yet)."""
    workdir = tmp_path_factory.mktemp("krylov")
    config = tiny_config()
    train.run(config, workdir)
    arnoldi.run(config, workdir)
    shutil.rmtree(workdir / "eigenpairs")
    return workdir


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("arnoldi__num_iters", 10, "arnoldi.num_iters"),
        ("arnoldi__hvp_batch_size", 32, "arnoldi.hvp_batch_size"),
        ("arnoldi__seed", 1, "arnoldi.seed"),
        ("model", "flax_cnn", "model"),
        ("train__num_epochs", 3, "train.num_epochs"),  # different params
    ],
)
def test_krylov_state_from_another_config(krylov_workdir, tmp_path, field, value, named):
    """A workdir holding a Krylov state refuses a config that differs in model, params, n, b or
    seed, naming the field, and leaves the state as it was."""
    workdir = tmp_path / "work"
    shutil.copytree(krylov_workdir, workdir)
    krylov_before = sorted(str(p) for p in (workdir / "krylov").rglob("*"))
    with pytest.raises(
        CheckpointError, match=rf"computed with {named}=.* but the config gives {named}="
    ):
        arnoldi.run(tiny_config(**{field: value}), workdir)
    assert sorted(str(p) for p in (workdir / "krylov").rglob("*")) == krylov_before


def test_scores_from_other_eigenpairs_are_refused(krylov_workdir, tmp_path):
    """Scoring with another p̃ than the eigenpairs in the workdir were distilled with is refused,
    naming distill.top_k, before anything is scored; the eigenpairs stay as they are."""
    workdir = tmp_path / "work"
    shutil.copytree(krylov_workdir, workdir)
    arnoldi.run(tiny_config(), workdir)
    before = sorted(str(p) for p in workdir.rglob("*"))
    with pytest.raises(
        CheckpointError, match=r"computed with distill.top_k=8 but the config gives"
    ):
        score.run(tiny_config(distill__top_k=6), workdir)
    assert sorted(str(p) for p in workdir.rglob("*")) == before
