"""Bad input ends in one clear line before any expensive work, and nothing saved is touched."""

import re
import shutil

import pytest

from checkpoints.checkpointer import Checkpointer, CheckpointError
from jobs import cli
from runtime import failpoints, preemption
from runtime.errors import InputError
from stages import fit, score, train
from tasks import mnist
from tests.pipeline_helpers import copy_trained, results, run_job, steps, tiny_config


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


@pytest.mark.slow
def test_bad_score_field_stops_the_pipeline_before_training(tmp_path):
    result = run_job("pipeline", tmp_path, "--config.distill.tail=bogus")
    assert "distill.tail='bogus'; choose one of none, damping, ritz" in _one_line_error(result)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"distill__tail": "damping", "l2": 0.0}, "l2 + distill.damping > 0"),
        ({"distill__damping": -1.0}, "distill.damping=-1.0 must be >= 0"),
        ({"distill__tail": "ritz", "score__num_queries": 257}, "takes at most 256 queries"),
        ({"score__query_block": 0}, "score.query_block >= 1"),
        ({"score__eigvecs_storage": "disk"}, "choose one of auto, device, host"),
        (
            {"score__eigvecs_storage": "host", "score__mode": "reverse"},
            "set score.mode=forward (or auto), or score.eigvecs_storage=device",
        ),
        (
            {"score__eigvecs_storage": "host", "method__name": "lissa"},
            "method lissa scores through its operator on the devices",
        ),
    ],
)
def test_bad_tail_and_query_fields(tmp_path, overrides, named):
    with pytest.raises(InputError, match=re.escape(named)):
        score.run(tiny_config(**overrides), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_missing_params_checkpoint(tmp_path):
    result = run_job("arnoldi", tmp_path)
    assert "no trained params" in _one_line_error(result) and "jobs.train" in result.stderr
    assert not (tmp_path / "params").exists() and not (results(tmp_path) / "krylov").exists()
    with pytest.raises(InputError, match="no trained params"):
        fit.run(tiny_config(), tmp_path)


def test_top_k_above_num_iters(tmp_path):
    with pytest.raises(
        InputError, match=r"distill.top_k=13 must be between 1 and arnoldi.num_iters=12"
    ):
        fit.run(tiny_config(distill__top_k=13), tmp_path)
    assert not any(tmp_path.iterdir())


def test_batch_not_divisible_by_data_axis(tmp_path):
    config = tiny_config(mesh__num_devices=8, mesh__data=8, arnoldi__hvp_batch_size=60)
    with pytest.raises(
        InputError, match=r"arnoldi.hvp_batch_size=60 .* 8 devices on the 'data' axis"
    ):
        fit.run(config, tmp_path)
    with pytest.raises(InputError, match=r"train.batch_size=60"):
        train.run(tiny_config(mesh__num_devices=8, train__batch_size=60), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def krylov_workdir(tmp_path_factory: pytest.TempPathFactory, runlocal_trained):
    """Params and a Krylov state, as if killed after the last Krylov save (no eigenpairs yet)."""
    workdir = copy_trained(runlocal_trained, tmp_path_factory.mktemp("krylov"))
    config = tiny_config()
    train.run(config, workdir)  # finds them
    fit.run(config, workdir)
    shutil.rmtree(results(workdir) / "fitted")
    return workdir


@pytest.mark.slow
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
    krylov = results(workdir) / "krylov"
    krylov_before = sorted(str(p) for p in krylov.rglob("*"))
    with pytest.raises(
        CheckpointError, match=rf"computed with {named}=.* but the config gives {named}="
    ):
        fit.run(tiny_config(**{field: value}), workdir)
    assert sorted(str(p) for p in krylov.rglob("*")) == krylov_before


def test_scores_from_other_eigenpairs_are_refused(krylov_workdir, tmp_path):
    """Scoring with another p̃ than the eigenpairs in the workdir were distilled with is refused,
    naming distill.top_k, before anything is scored; the eigenpairs stay as they are."""
    workdir = tmp_path / "work"
    shutil.copytree(krylov_workdir, workdir)
    fit.run(tiny_config(), workdir)
    before = sorted(str(p) for p in workdir.rglob("*"))
    with pytest.raises(
        CheckpointError, match=r"computed with distill.top_k=8 but the config gives"
    ):
        score.run(tiny_config(distill__top_k=6), workdir)
    assert sorted(str(p) for p in workdir.rglob("*")) == before


def test_only_input_errors_are_one_line(tmp_path, monkeypatch) -> None:
    """The binary's error handling: the project's input errors exit 2 with one line; anything
    else raised inside a stage (here a ValueError from task code, i.e. a bug) propagates with its
    traceback instead of being dressed up as bad input."""

    def bug(*args, **kwargs):
        raise ValueError("a bug inside the task")

    monkeypatch.setattr(mnist, "load_splits", bug)  # called by mnist.get_task
    with pytest.raises(ValueError, match="a bug inside the task"):
        cli.run_stages([train.run], tiny_config(), str(tmp_path))
    monkeypatch.undo()
    with pytest.raises(SystemExit) as stopped:
        cli.run_stages([fit.run], tiny_config(), str(tmp_path))  # no trained params
    assert stopped.value.code == 2


@pytest.mark.parametrize("how", ["exception", "preemption"])
def test_checkpointers_close_on_every_exit_path(krylov_workdir, tmp_path, monkeypatch, how):
    """Arnoldi stopped at iteration 3 by an unexpected exception or a preemption: every
    Checkpointer the stage opened is closed (pending saves finished), and the preempted run's
    state of iteration 3 is on disk."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    shutil.copytree(krylov_workdir / "params", workdir / "params")
    opened, closed = [], []
    real_init, real_close = Checkpointer.__init__, Checkpointer.close

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        opened.append(self)

    def close(self):
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(Checkpointer, "__init__", init)
    monkeypatch.setattr(Checkpointer, "close", close)
    if how == "exception":

        def fail(name, position):
            if name == "arnoldi_iteration" and position == 3:
                raise RuntimeError("injected")

        monkeypatch.setattr(failpoints, "maybe_fail", fail)
        expected = pytest.raises(RuntimeError, match="injected")
    else:
        monkeypatch.setattr(preemption, "reached", lambda step: step == 3)
        expected = pytest.raises(preemption.Preempted)
    with expected:
        fit.run(tiny_config(), workdir)
    # The params' and the Krylov state's (a fit stage opens fitted/ only once it exists).
    directories = {str(c.directory) for c in opened}
    assert {str(workdir / "params"), str(results(workdir) / "krylov")} <= directories
    assert {id(c) for c in opened} == {id(c) for c in closed}
    if how == "preemption":
        assert steps(results(workdir) / "krylov") == [3]
