"""The task contract (``tasks/base.py``): a task path or a task that breaks the contract is a
one-line error before any compute. (A user's task running through the jobs unchanged is the
README's bring-your-own-model example, run and checked by tests/test_readme.py.)"""

import textwrap

import pytest

from stages import train
from tasks.sources import DataError
from tests.pipeline_helpers import run_job, tiny_config


def test_task_path_that_does_not_exist_is_one_line(tmp_path) -> None:
    result = run_job("train", tmp_path, "--config.task=my_package.no_such_task")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "config.task='my_package.no_such_task': no module" in last
    assert not (tmp_path / "train_state").exists() and not (tmp_path / "params").exists()


BROKEN_TASKS = {
    "no_entry_point": ("x = 1", r"has no get_task\(config, workdir\) function"),
    "not_a_task": ("def get_task(config, workdir):\n    return {}", "returned dict, not a"),
    "missing_split": (
        """
        from tasks import mnist
        def get_task(config, workdir):
            task = mnist.get_task(config, workdir)
            import dataclasses
            return dataclasses.replace(task, splits={"train": task.splits["train"]})
        """,
        r"splits lack \['eval'\]",
    ),
    "missing_column": (
        """
        import dataclasses
        from tasks import mnist
        def get_task(config, workdir):
            task = mnist.get_task(config, workdir)
            return dataclasses.replace(task, record_columns=("label", "confidence"))
        """,
        r"training examples lack the columns \['confidence'\]",
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN_TASKS))
def test_task_that_breaks_the_contract(tmp_path, monkeypatch, name) -> None:
    source, message = BROKEN_TASKS[name]
    package = tmp_path / "user_tasks"
    package.mkdir()
    (package / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    workdir = tmp_path / "workdir"
    with pytest.raises(DataError, match=message):
        train.run(tiny_config(task=f"user_tasks.{name}"), workdir)
    assert not workdir.exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("params.include", "Dense_9/.*", "select none of the 6 parameter leaves"),
        ("params.exclude", ".*", "select none of the 6 parameter leaves"),
        ("params.include", "Dense_0/(", "is not a valid regular expression"),
    ],
)
def test_parameter_pattern_that_selects_nothing(tmp_path, field, value, message) -> None:
    """Refused before the params are even looked for (the workdir has none)."""
    result = run_job("arnoldi", tmp_path, f"--config.{field}={value}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert not any(tmp_path.iterdir())
