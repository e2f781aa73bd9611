"""--profile_steps=a:b: a jax.profiler trace of those steps of every loop, in the workdir."""

from pathlib import Path

import pytest

from runtime import profile
from runtime.errors import InputError
from stages import fit
from tests.pipeline_helpers import copy_trained, run_job, tiny_config


def test_profile_steps_trace_each_loop(runlocal_trained: Path, tmp_path: Path) -> None:
    """Arnoldi steps 2..3 traced into <workdir>/profile/arnoldi/process-0/ (an .xplane.pb the
    profile plugin reads), no other loop; an unset window traces nothing."""
    workdir = copy_trained(runlocal_trained, tmp_path / "w")
    profile.configure(workdir, "2:3")
    try:
        fit.run(tiny_config(), workdir)
    finally:
        profile.configure(workdir, "")
    traces = list((workdir / "profile" / "arnoldi" / "process-0").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert sorted(p.name for p in (workdir / "profile").iterdir()) == ["arnoldi"]
    with profile.Window("score") as window:  # unset: every step is a no-op
        for step in range(4):
            window.at(step)
    assert sorted(p.name for p in (workdir / "profile").iterdir()) == ["arnoldi"]


@pytest.mark.parametrize("spec", ["3", "0:2", "5:2", "a:b"])
def test_bad_profile_steps(spec: str, tmp_path: Path) -> None:
    if spec == "3":  # one step: a:a
        profile.configure(tmp_path, spec)
        assert profile._SETTING[0][1:] == (3, 3)
        profile.configure(tmp_path, "")
        return
    with pytest.raises(InputError, match=r"--profile_steps=.*1 <= a <= b"):
        profile.configure(tmp_path, spec)


def test_bad_profile_steps_is_one_line_before_any_work(tmp_path: Path) -> None:
    done = run_job("fit", tmp_path / "w", "--profile_steps=4:1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --profile_steps='4:1'")
    assert not (tmp_path / "w").exists()
