"""The cluster launchers (launch/tpu_pod.sh, launch/gpu_slurm.sbatch) with gcloud and srun stubbed.

No pod or cluster is reachable from CI, so the stubs stand in for them: a fake ``gcloud`` that
records every call and runs the ssh commands in one directory per fake TPU worker (as that
worker's home), and a fake ``srun`` that records its arguments (and runs the per-node check the
batch script starts with). What the scripts would do on a real slice or cluster is then checked
for real: the job detached on every worker, its log, a second start refused, ``stop`` delivering
SIGTERM and clearing the TPU lock; the srun command's GPU, signal and CPU settings.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pipeline_helpers import REPO

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Records the call; `compute tpus tpu-vm ssh ... --worker=W --command=C` runs C with bash once
# per worker (HOME = that worker's directory) unless FAKE_EXECUTE=0; scp copies the file there.
printf '%s\0' "$@" >>"$FAKE_GCLOUD_LOG"; printf '\036' >>"$FAKE_GCLOUD_LOG"
worker="" command="" files=()
for arg in "${@:5}"; do
  case $arg in
    --worker=*) worker=${arg#--worker=} ;;
    --command=*) command=${arg#--command=} ;;
    --*) ;;
    *) files+=("$arg") ;;
  esac
done
if [ "$worker" = all ]; then workers=$(seq 0 $((FAKE_NUM_WORKERS - 1))); else workers=$worker; fi
for w in $workers; do
  home="$FAKE_WORKERS_DIR/worker$w"
  mkdir -p "$home"
  case "$4" in
    ssh) if [ "${FAKE_EXECUTE:-1}" = 1 ]; then HOME="$home" bash -c "$command" || exit $?; fi ;;
    scp) cp "${files[0]}" "$home/influence.tar.gz" ;;
  esac
done
"""

# What stands in for .venv/bin/python on a fake worker: records its arguments, then runs until
# SIGTERM, which it records (the job's preemption save) before exiting 0.
FAKE_PYTHON = r"""#!/usr/bin/env bash
printf '%s\n' "$@" >"$HOME/argv"
trap 'echo TERM >>"$HOME/signals"; exit 0' TERM
while :; do sleep 0.1; done
"""

FAKE_SRUN = r"""#!/usr/bin/env bash
printf '%s\0' "$@" >>"$FAKE_SRUN_LOG"; printf '\036' >>"$FAKE_SRUN_LOG"
# The per-node check (srun ... bash -c '<check>'): run it here, once per node.
if [ "${*: -3:1}" = bash ] && [ "${*: -2:1}" = -c ]; then
  for _ in $(seq "$SLURM_JOB_NUM_NODES"); do bash -c "${*: -1}" || exit $?; done
fi
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_pod(tmp_path: Path) -> dict[str, str]:
    """The environment for launch/tpu_pod.sh against 2 fake workers, each with a set-up .venv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write(bin_dir / "gcloud", FAKE_GCLOUD)
    workers = tmp_path / "workers"
    for w in range(2):
        venv_bin = workers / f"worker{w}" / "influence" / ".venv" / "bin"
        venv_bin.mkdir(parents=True)
        _write(venv_bin / "python", FAKE_PYTHON)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "TPU": "my-v5p-16",
        "ZONE": "us-east5-a",
        "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud.log"),
        "FAKE_WORKERS_DIR": str(workers),
        "FAKE_NUM_WORKERS": "2",
        "TPU_LOCKFILE": str(tmp_path / "libtpu_lockfile"),
        "STOP_GRACE_SECS": "20",
    }


def tpu_pod(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "launch" / "tpu_pod.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def recorded_calls(log: Path) -> list[list[str]]:
    """The argument lists a stub recorded (NUL between arguments, RS after each call)."""
    if not log.exists():
        return []
    return [call.split("\0")[:-1] for call in log.read_text().split("\036")[:-1]]


def gcloud_calls(env: dict[str, str]) -> list[list[str]]:
    return recorded_calls(Path(env["FAKE_GCLOUD_LOG"]))


def worker_home(env: dict[str, str], w: int) -> Path:
    return Path(env["FAKE_WORKERS_DIR"]) / f"worker{w}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_tpu_run_detaches_logs_refuses_twice_and_stops(fake_pod: dict[str, str]) -> None:
    run = ("run", "jobs.arnoldi", "--config=configs/mnist.py:pod", "--workdir=gs://b/mnist")
    started = tpu_pod(fake_pod, *run)
    assert started.returncode == 0, started.stderr
    (ssh,) = gcloud_calls(fake_pod)
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-v5p-16"]
    assert "--zone=us-east5-a" in ssh and "--worker=all" in ssh
    pids = []
    for w in range(2):
        home = worker_home(fake_pod, w) / "influence"
        pid = int((home / "run.pid").read_text())
        pids.append(pid)
        assert alive(pid), f"worker {w}: the job did not outlive the ssh command"
        deadline = time.monotonic() + 10
        while not (worker_home(fake_pod, w) / "argv").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        argv = (worker_home(fake_pod, w) / "argv").read_text().split()
        assert argv == [
            "-m",
            "jobs.arnoldi",
            "--distributed=on",
            "--config=configs/mnist.py:pod",
            "--workdir=gs://b/mnist",
        ]
        log = home / "logs" / "latest.log"
        assert log.is_symlink() and re.fullmatch(
            r"jobs\.arnoldi-\d{8}-\d{6}\.log", os.readlink(log)
        )
        assert os.getpgid(pid) == pid, "not in a session of its own: a hung-up ssh would reach it"
    try:
        again = tpu_pod(fake_pod, *run)
        assert again.returncode == 2 and "is already running a job" in again.stderr
        status = tpu_pod(fake_pod, "status")
        assert status.returncode == 0 and status.stdout.count("running (pid") == 2

        Path(fake_pod["TPU_LOCKFILE"]).write_text("")
        stopped = tpu_pod(fake_pod, "stop")
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.count("stopped") == 2
        for w, pid in enumerate(pids):
            assert not alive(pid)
            assert (worker_home(fake_pod, w) / "signals").read_text() == "TERM\n"
            assert not (worker_home(fake_pod, w) / "influence" / "run.pid").exists()
        assert not Path(fake_pod["TPU_LOCKFILE"]).exists()
    finally:
        for pid in pids:
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)


def test_tpu_refuses_bad_runs_before_any_gcloud_call(fake_pod: dict[str, str]) -> None:
    local = tpu_pod(fake_pod, "run", "jobs.arnoldi", "--workdir=/tmp/w")
    assert local.returncode == 2 and "--workdir=gs://" in local.stderr
    not_a_job = tpu_pod(fake_pod, "run", "stages.arnoldi", "--workdir=gs://b/w")
    assert not_a_job.returncode == 2 and "jobs.<name>" in not_a_job.stderr
    assert tpu_pod(fake_pod, "frobnicate").returncode == 2
    assert tpu_pod({**fake_pod, "TPU": ""}, "status").returncode != 0
    assert gcloud_calls(fake_pod) == []


def test_tpu_run_without_setup_says_so(fake_pod: dict[str, str]) -> None:
    shutil.rmtree(worker_home(fake_pod, 1) / "influence" / ".venv")
    result = tpu_pod(fake_pod, "run", "jobs.arnoldi", "--workdir=gs://b/w")
    assert result.returncode == 2 and "run bash launch/tpu_pod.sh setup first" in result.stderr
    os.killpg(int((worker_home(fake_pod, 0) / "influence" / "run.pid").read_text()), signal.SIGTERM)


def test_tpu_setup_installs_python_311_and_the_tpu_build(fake_pod: dict[str, str]) -> None:
    """setup copies the committed tree to every worker and runs a valid script that installs
    Python 3.11 where it is missing and builds .venv with jax[tpu] (recorded, not executed: it
    would install packages)."""
    if not (REPO / ".git").exists():
        pytest.skip("setup packs the committed tree with git archive: needs a git checkout")
    result = tpu_pod({**fake_pod, "FAKE_EXECUTE": "0"}, "setup")
    assert result.returncode == 0, result.stderr
    scp, ssh = gcloud_calls(fake_pod)
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[5] == "my-v5p-16:~/influence.tar.gz"
    listing = subprocess.run(
        ["tar", "-tzf", str(worker_home(fake_pod, 0) / "influence.tar.gz")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "launch/setup_venv.sh" in listing and "jobs/cli.py" in listing
    script = next(a for a in ssh if a.startswith("--command=")).removeprefix("--command=")
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert "command -v python3.11" in script and "python3.11-venv" in script
    assert "PYTHON=python3.11 JAX_EXTRA=tpu bash launch/setup_venv.sh" in script


def sbatch_options(path: Path) -> list[str]:
    return [
        ln.split(None, 1)[1] for ln in path.read_text().splitlines() if ln.startswith("#SBATCH")
    ]


def test_slurm_script_uses_the_documented_interfaces(tmp_path: Path) -> None:
    """GPUs per node (every task sees its node's GPUs; JAX picks GPU SLURM_LOCALID), an early
    SIGTERM sized for a save, --cpus-per-task passed to srun, a per-node check of the venv."""
    options = sbatch_options(REPO / "launch" / "gpu_slurm.sbatch")
    assert "--gpus-per-node=8" in options and "--ntasks-per-node=8" in options
    assert not any(o.startswith("--gpus-per-task") for o in options)
    (signal_option,) = [o for o in options if o.startswith("--signal=")]
    assert re.fullmatch(r"--signal=TERM@(\d+)", signal_option)
    assert int(signal_option.rsplit("@", 1)[1]) >= 300

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write(bin_dir / "srun", FAKE_SRUN)
    # The repository as a shared filesystem would hold it: the script and a set-up .venv.
    shared = tmp_path / "shared"
    (shared / "launch").mkdir(parents=True)
    shutil.copy(REPO / "launch" / "gpu_slurm.sbatch", shared / "launch")
    (shared / ".venv" / "bin").mkdir(parents=True)
    _write(shared / ".venv" / "bin" / "python", "#!/bin/sh\n")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_SRUN_LOG": str(tmp_path / "srun.log"),
        "SLURM_SUBMIT_DIR": str(shared),
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_CPUS_PER_TASK": "12",
    }
    args = ["jobs.arnoldi", "--config=configs/mnist.py:pod", "--workdir=/shared/w"]

    def sbatch(**overrides: str) -> subprocess.CompletedProcess:
        """The batch script as the batch step runs it (stubbed srun)."""
        return subprocess.run(
            ["bash", str(shared / "launch" / "gpu_slurm.sbatch"), *args],
            env={**env, **overrides},
            capture_output=True,
            text=True,
            timeout=60,
        )

    result = sbatch()
    assert result.returncode == 0, result.stderr
    check, job = recorded_calls(tmp_path / "srun.log")
    assert "--nodes=2" in check and "--ntasks-per-node=1" in check
    assert "--kill-on-bad-exit=1" in job and "--cpus-per-task=12" in job
    assert job[job.index(".venv/bin/python") :] == [
        ".venv/bin/python",
        "-m",
        "jobs.arnoldi",
        "--distributed=on",
        "--config=configs/mnist.py:pod",
        "--workdir=/shared/w",
    ]

    # A node that cannot see the venv: the per-node check stops the job before it starts.
    shutil.rmtree(shared / ".venv")
    missing = sbatch()
    assert missing.returncode == 2 and "cannot see" in missing.stderr
    assert len(recorded_calls(tmp_path / "srun.log")) == 3  # the check only, no job step
    wrong_dir = sbatch(SLURM_SUBMIT_DIR=str(tmp_path))
    assert wrong_dir.returncode == 2 and "submit from there" in wrong_dir.stderr


def test_shell_scripts_pass_bash_n_and_shellcheck() -> None:
    scripts = sorted((REPO / "launch").glob("*.sh")) + sorted((REPO / "launch").glob("*.sbatch"))
    assert len(scripts) >= 5
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    done = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_fashion_mnist_is_installed_or_named(tmp_path: Path) -> None:
    """launch/fashion_mnist.sh (sourced by launch/local.sh for configs/vision.py): as root it
    runs apt-get; a user who may not gets one line saying what to run, exit 2."""
    stubs = tmp_path / "bin"
    stubs.mkdir()

    def stub(name: str, body: str) -> None:
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)

    env = {
        **os.environ,
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "FASHION_MNIST_DIR": str(tmp_path / "absent"),
    }
    run = lambda: subprocess.run(  # noqa: E731
        ["bash", "-c", "source launch/fashion_mnist.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    stub("id", "echo 1000")
    stub("sudo", "exit 1")
    stub("apt-get", f'echo "$@" >> {tmp_path}/apt.log')
    denied = run()
    assert denied.returncode == 2 and not (tmp_path / "apt.log").exists()
    assert (
        denied.stderr.count("\n") == 1 and "apt-get install dataset-fashion-mnist" in denied.stderr
    )
    stub("id", "echo 0")
    assert run().returncode == 0
    assert "install -y -q dataset-fashion-mnist" in (tmp_path / "apt.log").read_text()
