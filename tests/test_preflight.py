"""jobs/preflight.py: the checks before a long multi-process run.

The code digest in-process; the job as one process, as two processes joined by jax.distributed on
127.0.0.1 (launch/multiprocess.py), and as two processes of which one is pointed at an edited
copy of the tree (``--source_root``), which both refuse with one line.
"""

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import preflight
from launch import multiprocess
from tests import xla_flags
from tests.pipeline_helpers import REPO, job_env


def copy_sources(destination: Path) -> Path:
    """The source files of this repository (only those: no .git, no .venv) under ``destination``."""
    for relative in preflight.source_files(REPO):
        (destination / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / relative, destination / relative)
    return destination


def test_the_digest_is_of_the_source_files_only(tmp_path: Path) -> None:
    copy = copy_sources(tmp_path / "copy")
    digest = preflight.code_digest(REPO)
    assert preflight.code_digest(copy) == digest, "a checkout elsewhere is the same code"
    assert Path("jobs/preflight.py") in preflight.source_files(REPO)
    assert Path("launch/gpu_slurm.sbatch") in preflight.source_files(REPO)
    assert Path("setup.py") in preflight.source_files(REPO)
    # What a process writes beside the code is not code.
    for written in (".venv/lib/x.py", "env/pyvenv.cfg", "env/y.py", "jobs/__pycache__/z.py"):
        (copy / written).parent.mkdir(parents=True, exist_ok=True)
        (copy / written).write_text("x = 1\n")
    (copy / "workdir.json").write_text("{}")
    assert preflight.code_digest(copy) == digest
    edited = copy / "jobs" / "fit.py"
    original = edited.read_text()
    edited.write_text(original + "# edited\n")
    assert preflight.code_digest(copy) != digest
    edited.write_text(original)
    assert preflight.code_digest(copy) == digest
    edited.rename(copy / "jobs" / "fit2.py")
    assert preflight.code_digest(copy) != digest, "a renamed file is another tree"


def test_one_process_passes_and_bad_flags_are_one_line(tmp_path: Path) -> None:
    def preflight_job(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "jobs.preflight", *flags],
            cwd=REPO,
            env=job_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )

    ok = preflight_job(f"--workdir={tmp_path / 'w'}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    (line,) = ok.stdout.splitlines()
    digest = preflight.code_digest(REPO)[:12]
    assert line.startswith("preflight ok: 1 process(es), 1 cpu device(s)") and digest in line
    for flags, message in [
        ((), "error: --workdir is required"),
        ((f"--workdir={tmp_path}", "--source_root=/nonexistent"), "holds no source files"),
    ]:
        bad = preflight_job(*flags)
        assert bad.returncode == 2 and bad.stdout == ""
        assert bad.stderr.strip().splitlines()[-1].startswith("error:")
        assert message in bad.stderr


def launch(workdir: Path, process_1_source_root: Path | None = None) -> tuple[tuple, str]:
    """jobs.preflight as 2 processes of 2 CPU devices; process 1 digests
    ``process_1_source_root`` if given. (The exit codes, the prefixed output.)"""
    extra = f"--source_root={process_1_source_root}" if process_1_source_root else ""
    command = [
        "bash",
        "-c",
        'if [ "$INFLUENCE_PROCESS_ID" = 1 ] && [ -n "$0" ]; then set -- "$@" "$0"; fi; '
        'exec "$PYTHON" -m jobs.preflight "$@"',
        extra,
        f"--workdir={workdir}",
    ]
    sink = io.StringIO()
    outcome = multiprocess.launch(
        command,
        2,
        2,
        grace_secs=60,
        sink=sink,
        env={"XLA_FLAGS": xla_flags.THREADS, "PYTHON": sys.executable},
        cwd=REPO,
        timeout_secs=300,
    )
    return outcome.codes, sink.getvalue()


@pytest.mark.slow
def test_two_processes_pass(tmp_path: Path) -> None:
    codes, output = launch(tmp_path / "w")
    assert codes == (0, 0), output[-3000:]
    (line,) = [ln for ln in output.splitlines() if "preflight ok" in ln]
    assert line.startswith("[0] preflight ok: 2 process(es), 4 cpu device(s) summed")
    assert f"--workdir={tmp_path / 'w'} writable and shared" in line


@pytest.mark.slow
def test_two_processes_on_different_code_are_refused(tmp_path: Path) -> None:
    copy = copy_sources(tmp_path / "copy")
    edited = copy / "stages" / "fit.py"
    edited.write_text(edited.read_text() + "# edited on one worker only\n")
    codes, output = launch(tmp_path / "w", process_1_source_root=copy)
    assert codes == (2, 2), output[-3000:]
    for process in (0, 1):
        errors = [ln for ln in output.splitlines() if ln.startswith(f"[{process}] error:")]
        assert len(errors) == 1 and errors[0].startswith(
            f"[{process}] error: workers run different code: process(es) [1] of 2 "
        ), output[-3000:]
        assert "rerun setup" in errors[0]
    assert "preflight ok" not in output
