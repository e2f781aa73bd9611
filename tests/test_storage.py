"""Workdirs that are not what a job needs, each one line before any work: a node-local workdir
under several processes, a gs:// bucket that refuses the job's account."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from etils import epath

from launch import multiprocess
from runtime import storage
from runtime import workdir as wd
from runtime.errors import InputError
from tests import xla_flags
from tests.pipeline_helpers import REPO


def test_node_local_workdir_is_one_line_on_every_process(tmp_path: Path) -> None:
    """Two processes whose --workdir resolves to two directories (each its own working
    directory, as two hosts' /tmp would): both stop with the line naming process 1, exit 2,
    before training."""
    port = multiprocess.free_port()
    procs = []
    for i in range(2):
        cwd = tmp_path / f"host{i}"
        cwd.mkdir()
        env = {**multiprocess.process_env(i, 2, 1, port), "XLA_FLAGS": xla_flags.THREADS}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        command = [
            sys.executable,
            "-m",
            "jobs.train",
            f"--config={REPO / 'configs/mnist.py'}:runlocal",
            "--workdir=workdirs/local",
        ]
        procs.append(subprocess.Popen(command, cwd=cwd, env=env, stderr=subprocess.PIPE, text=True))
    for i, proc in enumerate(procs):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: --workdir=workdirs/local is not shared: process(es) [1] "), (
            last
        )
        assert "not a node-local path" in last
        assert not (tmp_path / f"host{i}" / "workdirs/local/params").exists()


class PermissionDeniedError(Exception):
    """Stands for tensorflow.errors.PermissionDeniedError, as TF's gs:// filesystem raises it."""


def test_refused_bucket_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    path_type = type(epath.Path("gs://bucket/run"))

    def refuse(*args, **kwargs):
        raise PermissionDeniedError(
            'Error executing an HTTP request: HTTP response code 403 with body \'{\n  "error": '
            '{\n    "code": 403,\n    "message": "sa@p.iam does not have storage.objects.'
            "create access to the Google Cloud Storage object.\"\n  }\n}'\n\t when initiating "
            "an upload to gs://bucket/run/.write-probe-0"
        )

    monkeypatch.setattr(path_type, "mkdir", refuse)
    with pytest.raises(InputError) as raised:
        wd.ensure_writable("gs://bucket/run")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("storage refused access to --workdir=gs://bucket/run (")
    assert "roles/storage.objectAdmin" in message


@pytest.mark.parametrize(
    ("error", "refused"),
    [
        (PermissionError(13, "Permission denied"), True),
        (OSError(30, "Read-only file system"), True),
        (ValueError("PERMISSION_DENIED: Error writing to gs://b/x/ocdbt"), True),
        (RuntimeError("a bug, not storage"), False),
        (OSError(28, "No space left on device"), False),
    ],
)
def test_refusal_classification(error: BaseException, refused: bool) -> None:
    assert (storage.refusal(error) is not None) == refused


def test_refusal_is_found_through_the_cause() -> None:
    try:
        try:
            raise ValueError("UNAUTHENTICATED: no credentials")
        except ValueError as inner:
            raise RuntimeError("the save failed") from inner
    except RuntimeError as outer:
        assert storage.refusal(outer) == "ValueError: UNAUTHENTICATED: no credentials"


def test_report_copies_shared_state_where_links_do_not_exist(tmp_path: Path) -> None:
    """The report's copy for object stores (``gs://`` has no symlinks): a nested tree, through
    the epath calls an object store implements (iterdir, copy, mkdir)."""
    from stages import report

    source = tmp_path / "params"
    (source / "8" / "state").mkdir(parents=True)
    (source / "8" / "state" / "d").write_bytes(b"\x00\x01" * 100)
    (source / "8" / "_CHECKPOINT_METADATA").write_text("{}")
    report._copy_tree(epath.Path(source), epath.Path(tmp_path / "copy"))
    copied = sorted(p.relative_to(tmp_path / "copy") for p in (tmp_path / "copy").rglob("*"))
    assert copied == sorted(p.relative_to(source) for p in source.rglob("*"))
    assert (tmp_path / "copy/8/state/d").read_bytes() == b"\x00\x01" * 100


def test_refusal_mid_run_is_one_line(tmp_path: Path) -> None:
    """A stage whose write is refused (tensorstore's message for a bucket that says no) ends the
    job with one line naming the workdir, exit 2, not a traceback from inside the library."""
    script = (
        "import ml_collections\n"
        "from jobs import cli\n"
        "def stage(config, workdir):\n"
        "    try:\n"
        "        raise ValueError('PERMISSION_DENIED: Error writing \"ocdbt\" in gs://b/run')\n"
        "    except ValueError as e:\n"
        "        raise RuntimeError('the save failed') from e\n"
        f"cli.run_stages([stage], ml_collections.ConfigDict(), {str(tmp_path / 'w')!r})\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags.THREADS}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: storage refused access to --workdir={tmp_path / 'w'} ")
    assert "PERMISSION_DENIED" in lines[-1] and "Traceback" not in done.stderr
