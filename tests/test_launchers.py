"""The cluster launchers (launch/tpu_pod.sh, launch/gpu_slurm.sbatch) with gcloud, srun and
scontrol stubbed.

No pod or cluster is reachable from CI, so the stubs stand in for them: a fake ``gcloud`` that
records every call and plays a small Cloud TPU project (a queued resource that can be created,
preempted and deleted; its workers are directories, each the home of a clean ``bash`` that runs
the ssh commands, with stubs for apt-get, sudo and the metadata server), and a fake ``srun`` and
``scontrol`` that record their arguments. What the scripts would do on a real slice or cluster
is then checked for real: setup waiting for the dpkg lock and leaving its marker, a worker whose
setup failed refused by run, the job detached on every worker with its environment, its log
copied to the workdir and its exit code recorded, ``stop`` delivering SIGTERM and clearing the
TPU lock, ``watch`` recreating a preempted slice and stopping on bad input, the dry run; the srun
steps' GPU, signal and CPU settings, the preflight step, the requeue of a preempted job.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pipeline_helpers import REPO

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Records the call, then plays a Cloud TPU project whose state is in $FAKE_CLOUD_DIR (qr: the
# queued resource's state, node: the TPU VM's, gone: deleted):
# - queued-resources create, delete, describe and tpu-vm describe act on that state; a new slice
#   has fresh workers (no homes), a deleted one's processes are killed;
# - ssh --worker=W --command=C runs C with bash once per worker in a clean environment (HOME =
#   the worker's directory, the workers' PATH, the FAKE_* variables and FAKE_WORKER_ID), unless
#   FAKE_EXECUTE=0; every worker runs even when one fails (the call then fails); a preempted or
#   deleted slice refuses the connection. scp copies the file to every worker's home;
# - storage cp (from a worker) copies into $FAKE_CLOUD_DIR/buckets/.
{ flock 9; printf '%s\0' "$@" >>"$FAKE_GCLOUD_LOG"; printf '\036' >>"$FAKE_GCLOUD_LOG"; } 9>>"$FAKE_GCLOUD_LOG.lock"
cloud=$FAKE_CLOUD_DIR
if [ "$1" = storage ]; then
  paths=()
  for arg in "${@:3}"; do case $arg in --*) ;; *) paths+=("$arg") ;; esac; done
  dest="$cloud/buckets/${paths[1]#gs://}"
  mkdir -p "$(dirname "$dest")" && exec cp "${paths[0]}" "$dest"
fi
case "$3 $4" in
  "queued-resources create")
    if [ -f "$cloud/qr" ]; then echo "ERROR: ALREADY_EXISTS: $5" >&2; exit 1; fi
    echo ACTIVE >"$cloud/qr"; echo READY >"$cloud/node"; rm -f "$cloud/gone"
    rm -rf "$FAKE_WORKERS_DIR"
    exit 0 ;;
  "queued-resources delete")
    for pid in "$FAKE_WORKERS_DIR"/*/influence/run.pid; do
      [ -f "$pid" ] && kill -KILL -- "-$(cat "$pid")" 2>/dev/null
    done
    sleep 0.2
    rm -rf "$FAKE_WORKERS_DIR" "$cloud/qr" "$cloud/node"; touch "$cloud/gone"
    exit 0 ;;
  "queued-resources describe" | "tpu-vm describe")
    file="$cloud/qr"; [ "$3" = tpu-vm ] && file="$cloud/node"
    [ -f "$file" ] || { echo "ERROR: (gcloud.compute.tpus.$3.describe) NOT_FOUND: $5" >&2; exit 1; }
    exec cat "$file" ;;
esac
if [ -f "$cloud/gone" ] || [ "$(cat "$cloud/node" 2>/dev/null || echo READY)" != READY ]; then
  echo "ERROR: ssh: connect to host $5 port 22: Connection refused" >&2
  exit 255
fi
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
keep=()
for name in $(compgen -e); do case $name in FAKE_*) keep+=("$name=${!name}") ;; esac; done
status=0
for w in $workers; do
  home="$FAKE_WORKERS_DIR/worker$w"
  mkdir -p "$home"
  case "$4" in
    ssh)
      if [ "${FAKE_EXECUTE:-1}" = 1 ]; then
        env -i "${keep[@]}" HOME="$home" PATH="$home/.local/bin:$FAKE_WORKER_PATH" \
          FAKE_WORKER_ID="$w" bash -c "$command" || status=$?
      fi ;;
    scp) cp "${files[0]}" "$home/influence.tar.gz" ;;
  esac
done
exit "$status"
"""

# What stands in for .venv/bin/python on a fake worker.
FAKE_PYTHON = r"""#!/usr/bin/env bash
# setup's calls (-c, -m pip) succeed at once, but pip fails on worker $FAKE_PIP_FAILS_ON;
# jobs.preflight records its arguments and exits $FAKE_PREFLIGHT_RC; a job records its arguments
# and environment, then does what line k of $FAKE_CLOUD_DIR/plan says for this worker's k-th job:
# exit with that code, "preempt" (the slice is preempted under it), or, with no line, run until
# SIGTERM, then record it and exit 75 as the job does after saving.
case "$1" in -c) exit 0 ;; esac
if [ "$2" = pip ]; then
  if [ "${FAKE_PIP_FAILS_ON:-}" = "$FAKE_WORKER_ID" ]; then echo "pip: no network" >&2; exit 1; fi
  exit 0
fi
if [ "$2" = jobs.preflight ]; then
  printf '%s\n' "$@" >"$HOME/preflight.argv"
  exit "${FAKE_PREFLIGHT_RC:-0}"
fi
printf '%s\n' "$@" >"$HOME/argv"
env >"$HOME/env"
echo "job started on worker $FAKE_WORKER_ID"
runs="$FAKE_CLOUD_DIR/runs-worker$FAKE_WORKER_ID"
echo >>"$runs"
step=$(sed -n "$(wc -l <"$runs")p" "$FAKE_CLOUD_DIR/plan" 2>/dev/null)
case "$step" in
  preempt) echo PREEMPTED >"$FAKE_CLOUD_DIR/node"; exec sleep 600 ;;
  [0-9]*) exit "$step" ;;
esac
trap 'echo TERM >>"$HOME/signals"; exit 75' TERM
while :; do sleep 0.1; done
"""

# python3.11 as apt installs it on a fake worker: what launch/setup_venv.sh asks of it.
FAKE_PYTHON311 = r"""#!/usr/bin/env bash
case "$1 ${2:-}" in
  "-c "*) exit 0 ;;
  "-m venv") mkdir -p "$3/bin" && cp "$FAKE_JOB_PYTHON" "$3/bin/python" ;;
  *) exit 1 ;;
esac
"""

# The rest of a fake worker's commands: apt-get with the dpkg lock held for its first
# $FAKE_DPKG_LOCKED calls (a fresh VM's unattended-upgrades; installing python3.11 puts the stub
# above on the worker's PATH), sudo, and the metadata server's worker number.
WORKER_STUBS = {
    "apt-get": r"""#!/usr/bin/env bash
echo "apt-get $*" >>"$HOME/apt.log"
calls=$(($(cat "$HOME/.apt-calls" 2>/dev/null || echo 0) + 1))
echo "$calls" >"$HOME/.apt-calls"
if [ "$calls" -le "${FAKE_DPKG_LOCKED:-0}" ]; then
  echo "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 1234 (unattended-upgr)" >&2
  exit 100
fi
case " $* " in
  *" python3.11 "*) mkdir -p "$HOME/.local/bin" && cp "$FAKE_PYTHON311" "$HOME/.local/bin/python3.11" ;;
esac
""",
    "add-apt-repository": '#!/usr/bin/env bash\necho "add-apt-repository $*" >>"$HOME/apt.log"\n',
    "sudo": '#!/usr/bin/env bash\nexec "$@"\n',
    "curl": (
        '#!/usr/bin/env bash\ncase "$*" in\n'
        '  *agent-worker-number*) echo "$FAKE_WORKER_ID" ;;\n  *) exit 22 ;;\nesac\n'
    ),
}

FAKE_SRUN = r"""#!/usr/bin/env bash
{ flock 9; printf '%s\0' "$@" >>"$FAKE_SRUN_LOG"; printf '\036' >>"$FAKE_SRUN_LOG"; } 9>>"$FAKE_SRUN_LOG.lock"
# The per-node check (srun ... bash -c '<check>'): run it here, once per node.
if [ "${*: -3:1}" = bash ] && [ "${*: -2:1}" = -c ]; then
  for _ in $(seq "$SLURM_JOB_NUM_NODES"); do bash -c "${*: -1}" || exit $?; done
  exit 0
fi
# A python step: jobs.preflight exits $FAKE_PREFLIGHT_RC, the job $FAKE_JOB_RC (default 0 both).
case " $* " in
  *" -m jobs.preflight "*) exit "${FAKE_PREFLIGHT_RC:-0}" ;;
  *) exit "${FAKE_JOB_RC:-0}" ;;
esac
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
{ flock 9; printf '%s\0' "$@" >>"$FAKE_SCONTROL_LOG"; printf '\036' >>"$FAKE_SCONTROL_LOG"; } 9>>"$FAKE_SCONTROL_LOG.lock"
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def system_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This machine's commands as a fresh TPU VM image has them: without Python 3.11 (links to
    everything on the system PATH but python3.11*), so setup installs it."""
    mirror = tmp_path_factory.mktemp("system_bin")
    for directory in (
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            link = mirror / entry.name
            if not entry.name.startswith("python3.11") and not link.exists():
                link.symlink_to(entry.path)
    return mirror


def git_head() -> str:
    """The commit setup copies (tests of setup and run need a git checkout)."""
    if not (REPO / ".git").exists():
        pytest.skip("setup packs the committed tree with git archive: needs a git checkout")
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def set_up_workers(env: dict[str, str], version: str) -> None:
    """Workers as a finished setup leaves them: a .venv and the code version marker."""
    for w in range(int(env["FAKE_NUM_WORKERS"])):
        remote = worker_home(env, w) / "influence"
        (remote / ".venv" / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy(env["FAKE_JOB_PYTHON"], remote / ".venv" / "bin" / "python")
        (remote / "code.version").write_text(version + "\n")


@pytest.fixture
def fake_pod(tmp_path: Path, system_bin: Path) -> Iterator[dict[str, str]]:
    """The environment for launch/tpu_pod.sh against a fake slice of 2 workers (no worker set up
    yet: ``set_up_workers``); whatever a test left running on them is killed afterwards."""
    stubs = tmp_path / "bin"
    worker_bin = tmp_path / "worker_bin"
    cloud = tmp_path / "cloud"
    for directory in (stubs, worker_bin, cloud):
        directory.mkdir()
    gcloud = _write(stubs / "gcloud", FAKE_GCLOUD)
    (worker_bin / "gcloud").symlink_to(gcloud)
    for name, text in WORKER_STUBS.items():
        _write(worker_bin / name, text)
    workers = tmp_path / "workers"
    env = {
        **os.environ,
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "TPU": "my-v5p-16",
        "ZONE": "us-east5-a",
        "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud.log"),
        "FAKE_CLOUD_DIR": str(cloud),
        "FAKE_WORKERS_DIR": str(workers),
        "FAKE_NUM_WORKERS": "2",
        "FAKE_WORKER_PATH": f"{worker_bin}:{system_bin}",
        "FAKE_JOB_PYTHON": str(_write(tmp_path / "fake_python", FAKE_PYTHON)),
        "FAKE_PYTHON311": str(_write(tmp_path / "fake_python3.11", FAKE_PYTHON311)),
        "TPU_LOCKFILE": str(tmp_path / "libtpu_lockfile"),
        "STOP_GRACE_SECS": "20",
        "APT_RETRY_SECS": "0",
        "POLL_SECS": "0.1",
    }
    for name in ("DRY_RUN", "SLICES", "PASS_ENV", "LIBTPU_INIT_ARGS", "PROJECT", "QR"):
        env.pop(name, None)
    yield env
    for pid_file in workers.glob("*/influence/run.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def tpu_pod(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "launch" / "tpu_pod.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def recorded_calls(log: Path) -> list[list[str]]:
    """The argument lists a stub recorded (NUL between arguments, RS after each call)."""
    if not log.exists():
        return []
    return [call.split("\0")[:-1] for call in log.read_text().split("\036")[:-1]]


def gcloud_calls(env: dict[str, str]) -> list[list[str]]:
    """The launcher's gcloud calls (not the workers' log copies: ``gcloud storage``)."""
    return [c for c in recorded_calls(Path(env["FAKE_GCLOUD_LOG"])) if c[0] == "compute"]


def worker_home(env: dict[str, str], w: int) -> Path:
    return Path(env["FAKE_WORKERS_DIR"]) / f"worker{w}"


def bucket(env: dict[str, str]) -> Path:
    return Path(env["FAKE_CLOUD_DIR"]) / "buckets"


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (an exited process not yet reaped, a zombie, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(path: Path, secs: float = 20) -> Path:
    deadline = time.monotonic() + secs
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path


RUN = ("run", "jobs.arnoldi", "--config=configs/mnist.py:pod", "--workdir=gs://b/mnist")


@pytest.mark.slow
def test_tpu_run_detaches_logs_refuses_twice_and_stops(fake_pod: dict[str, str]) -> None:
    set_up_workers(fake_pod, git_head())
    fake_pod["LOG_COPY_SECS"] = "0.2"
    started = tpu_pod(fake_pod, *RUN)
    assert started.returncode == 0, started.stderr
    versions, ssh = gcloud_calls(fake_pod)  # the code version check first
    assert "--worker=all" in versions and "code-version" in versions[-1]
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-v5p-16"]
    assert "--zone=us-east5-a" in ssh and "--worker=all" in ssh
    pids = []
    for w in range(2):
        home = worker_home(fake_pod, w) / "influence"
        pid = int((home / "run.pid").read_text())
        pids.append(pid)
        assert alive(pid), f"worker {w}: the job did not outlive the ssh command"
        argv = wait_for(worker_home(fake_pod, w) / "argv").read_text().split()
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
        # Copied to the workdir while it runs, named by job, time and worker.
        stamp = os.readlink(log).removeprefix("jobs.arnoldi-").removesuffix(".log")
        copied = bucket(fake_pod) / "b" / "mnist" / "logs" / f"jobs.arnoldi-{stamp}-worker{w}.log"
        assert "job started" in wait_for(copied).read_text()
    try:
        again = tpu_pod(fake_pod, *RUN)
        assert again.returncode == 2 and "is already running a job" in again.stderr
        status = tpu_pod(fake_pod, "status")
        assert status.returncode == 0 and status.stdout.count("running (pid") == 2

        Path(fake_pod["TPU_LOCKFILE"]).write_text("")
        stopped = tpu_pod(fake_pod, "stop")
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.count("stopped (exit 75)") == 2
        for w, pid in enumerate(pids):
            assert not alive(pid)
            assert (worker_home(fake_pod, w) / "signals").read_text() == "TERM\n"
            assert not (worker_home(fake_pod, w) / "influence" / "run.pid").exists()
            assert (worker_home(fake_pod, w) / "influence" / "run.rc").read_text() == "75\n"
        assert not Path(fake_pod["TPU_LOCKFILE"]).exists()
        status = tpu_pod(fake_pod, "status")
        assert status.stdout.count("exited 75 (preempted, state saved") == 2
        assert status.stdout.count("stopped by launch/tpu_pod.sh stop") == 2
    finally:
        for pid in pids:
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)


def test_tpu_refuses_bad_runs_before_any_gcloud_call(fake_pod: dict[str, str]) -> None:
    local = tpu_pod(fake_pod, "run", "jobs.arnoldi", "--workdir=/tmp/w")
    assert local.returncode == 2 and "--workdir=gs://" in local.stderr
    not_a_job = tpu_pod(fake_pod, "run", "stages.arnoldi", "--workdir=gs://b/w")
    assert not_a_job.returncode == 2 and "jobs.<name>" in not_a_job.stderr
    no_workdir = tpu_pod(fake_pod, "preflight")
    assert no_workdir.returncode == 2 and "--workdir=gs://" in no_workdir.stderr
    cannot_create = tpu_pod(fake_pod, "watch", "jobs.fit", "--workdir=gs://b/w")
    assert cannot_create.returncode == 2 and "ACCELERATOR_TYPE" in cannot_create.stderr
    bad_name = tpu_pod({**fake_pod, "PASS_ENV": "MY-VAR"}, *RUN)
    assert bad_name.returncode == 2 and "'MY-VAR' is not a variable name" in bad_name.stderr
    no_slices = tpu_pod({**fake_pod, "SLICES": "0"}, *RUN)
    assert no_slices.returncode == 2 and "SLICES=0" in no_slices.stderr
    assert tpu_pod(fake_pod, "frobnicate").returncode == 2
    assert tpu_pod({**fake_pod, "TPU": ""}, "status").returncode != 0
    assert gcloud_calls(fake_pod) == []


def test_tpu_setup_waits_for_the_dpkg_lock_and_leaves_a_marker(fake_pod: dict[str, str]) -> None:
    """setup on fresh workers (no Python 3.11) whose dpkg lock is held for the first 2 apt-get
    calls: it tries again, installs Python 3.11 and the TPU build, replaces an older tree and
    writes the commit as its last step."""
    head = git_head()
    stale = worker_home(fake_pod, 0) / "influence" / "removed_since.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    (stale.parent / "logs").mkdir()
    result = tpu_pod({**fake_pod, "FAKE_DPKG_LOCKED": "2"}, "setup")
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
    assert "PYTHON=python3.11 JAX_EXTRA=tpu bash launch/setup_venv.sh" in script
    assert result.stderr.count("the dpkg lock is held (try 1 of 30)") == 2
    assert result.stderr.count("the dpkg lock is held (try 2 of 30)") == 2
    for w in range(2):
        remote = worker_home(fake_pod, w) / "influence"
        apt = (worker_home(fake_pod, w) / "apt.log").read_text().splitlines()
        assert apt[:3] == ["apt-get -o DPkg::Lock::Timeout=300 -y -qq update"] * 3
        assert (
            apt[-1]
            == "apt-get -o DPkg::Lock::Timeout=300 -y -qq install python3.11 python3.11-venv"
        )
        assert (worker_home(fake_pod, w) / ".local" / "bin" / "python3.11").exists()
        assert (remote / ".venv" / "bin" / "python").exists()
        assert (remote / "jobs" / "cli.py").exists()
        assert (remote / "code.version").read_text() == head + "\n"
    assert not stale.exists() and (stale.parent / "logs").is_dir()


def test_tpu_run_refuses_workers_of_a_failed_or_other_setup(fake_pod: dict[str, str]) -> None:
    head = git_head()
    failed = tpu_pod({**fake_pod, "FAKE_PIP_FAILS_ON": "1"}, "setup")
    assert failed.returncode != 0 and "pip: no network" in failed.stderr
    assert (worker_home(fake_pod, 0) / "influence" / "code.version").read_text() == head + "\n"
    assert not (worker_home(fake_pod, 1) / "influence" / "code.version").exists()

    def refused(expected: str) -> None:
        result = tpu_pod(fake_pod, *RUN)
        assert result.returncode == 2
        assert result.stderr.splitlines() == [expected]
        assert not list(Path(fake_pod["FAKE_WORKERS_DIR"]).glob("*/influence/run.pid"))

    host = os.uname().nodename
    refused(
        f"error: worker 1 ({host}) has code none (setup did not finish), this tree {head}: "
        "run setup (bash launch/tpu_pod.sh setup)"
    )
    (worker_home(fake_pod, 1) / "influence" / "code.version").write_text("0123abc\n")
    refused(
        f"error: worker 1 ({host}) has code 0123abc, this tree {head}: run setup "
        "(bash launch/tpu_pod.sh setup)"
    )
    (worker_home(fake_pod, 1) / "influence" / "code.version").write_text(head + "\n")
    shutil.rmtree(worker_home(fake_pod, 1) / "influence" / ".venv")
    (worker_home(fake_pod, 0) / "influence" / "run.pid").unlink(missing_ok=True)
    result = tpu_pod({**fake_pod, "FAKE_NUM_WORKERS": "2"}, *RUN)
    assert result.returncode == 2 and "run bash launch/tpu_pod.sh setup first" in result.stderr


def test_tpu_run_passes_the_environment_and_records_the_exit_code(
    fake_pod: dict[str, str],
) -> None:
    """XLA_FLAGS, LIBTPU_INIT_ARGS and PASS_ENV's variables reach the job (nothing else of this
    environment does); the job's code lands in run.rc, its log in <workdir>/logs/."""
    set_up_workers(fake_pod, git_head())
    Path(fake_pod["FAKE_CLOUD_DIR"], "plan").write_text("3\n")
    env = {
        **fake_pod,
        "XLA_FLAGS": "--xla_dump_to=/tmp/dump --xla_flag='a b'",
        "LIBTPU_INIT_ARGS": "--xla_tpu_enable_async_all_gather=true",
        "PASS_ENV": "MY_SETTING OTHER_UNSET",
        "MY_SETTING": 'one two $three "four"',
        "NOT_PASSED": "1",
    }
    result = tpu_pod(env, "run", "jobs.fit", "--workdir=gs://b/w/")
    assert result.returncode == 0, result.stderr
    for w in range(2):
        remote = worker_home(fake_pod, w) / "influence"
        assert wait_for(remote / "run.rc").read_text() == "3\n"
        job_env = dict(
            line.split("=", 1)
            for line in (worker_home(fake_pod, w) / "env").read_text().splitlines()
        )
        for name in ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "MY_SETTING"):
            assert job_env[name] == env[name]
        assert "NOT_PASSED" not in job_env and "OTHER_UNSET" not in job_env
        (log,) = (bucket(fake_pod) / "b" / "w" / "logs").glob(f"jobs.fit-*-worker{w}.log")
        assert log.read_text() == f"job started on worker {w}\n"
    status = tpu_pod(fake_pod, "status")
    assert status.stdout.count("): exited 3;") == 2
    assert status.stdout.count("  | job started on worker") == 2


def test_tpu_preflight_runs_jobs_preflight_on_every_worker(fake_pod: dict[str, str]) -> None:
    set_up_workers(fake_pod, git_head())
    result = tpu_pod(fake_pod, "preflight", "--workdir=gs://b/w")
    assert result.returncode == 0, result.stderr
    for w in range(2):
        argv = (worker_home(fake_pod, w) / "preflight.argv").read_text().split()
        assert argv == ["-m", "jobs.preflight", "--distributed=on", "--workdir=gs://b/w"]
    assert not list(Path(fake_pod["FAKE_WORKERS_DIR"]).glob("*/influence/run.pid"))
    failing = tpu_pod({**fake_pod, "FAKE_PREFLIGHT_RC": "2"}, "preflight", "--workdir=gs://b/w")
    assert failing.returncode != 0


def test_tpu_dry_run_prints_every_command_and_runs_none(fake_pod: dict[str, str]) -> None:
    head = git_head()
    env = {**fake_pod, "ACCELERATOR_TYPE": "v5p-64", "RUNTIME_VERSION": "v2-alpha-tpuv5"}
    one = tpu_pod(env, "--dry-run", *RUN)
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith(
        "gcloud compute tpus tpu-vm ssh my-v5p-16 --zone=us-east5-a --worker=all --command="
    )
    assert "nohup setsid bash run.sh" in one.stdout
    many = tpu_pod({**env, "DRY_RUN": "1", "SLICES": "2"}, "watch", *RUN[1:])
    assert many.returncode == 0, many.stderr
    printed = [ln for ln in many.stdout.splitlines() if ln.startswith(("gcloud ", "git "))]
    assert printed[:4] == [
        "gcloud compute tpus queued-resources describe my-v5p-16-qr --zone=us-east5-a"
        " --format=value\\(state.state\\)",
        "gcloud compute tpus queued-resources create my-v5p-16-qr --zone=us-east5-a"
        " --accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --node-count=2"
        " --node-prefix=my-v5p-16 --spot",
        printed[2],
        printed[3],
    ]
    assert printed[2].startswith("git archive --format=tar.gz")
    assert printed[3].startswith("gcloud compute tpus queued-resources scp ")
    assert printed[3].endswith(
        "my-v5p-16-qr:\\~/influence.tar.gz --zone=us-east5-a --worker=all --node=all"
    )
    ssh = "gcloud compute tpus queued-resources ssh my-v5p-16-qr --node=all --zone=us-east5-a --worker=all"
    assert (
        sum(ln.startswith(ssh) for ln in printed) == 6
    )  # setup, 2 code checks, preflight, run, status
    assert f"echo {head} >code.version" in many.stdout
    assert "-m jobs.preflight --distributed=on --workdir=gs://b/mnist" in many.stdout
    assert "--workdir=gs://b/mnist --config.mesh.num_slices=2 </dev/null" in many.stdout
    assert many.stdout.rstrip().endswith("watch: the job finished (exit 0)")
    assert recorded_calls(Path(fake_pod["FAKE_GCLOUD_LOG"])) == []
    assert not Path(fake_pod["FAKE_WORKERS_DIR"]).exists()


def watch(env: dict[str, str], plan: list[str], **overrides: str) -> subprocess.CompletedProcess:
    """``watch jobs.fit`` from no slice at all; the k-th job on each worker does ``plan[k]``."""
    git_head()
    Path(env["FAKE_CLOUD_DIR"], "plan").write_text("".join(f"{step}\n" for step in plan))
    env = {**env, "ACCELERATOR_TYPE": "v5p-16", "RUNTIME_VERSION": "v2-alpha-tpuv5", **overrides}
    return tpu_pod(
        env, "watch", "jobs.fit", "--config=configs/mnist.py:pod", "--workdir=gs://b/w", timeout=60
    )


def verbs(env: dict[str, str]) -> list[str]:
    """The queued-resource calls, in order (create, delete)."""
    return [
        c[3]
        for c in gcloud_calls(env)
        if c[2] == "queued-resources" and c[3] in ("create", "delete")
    ]


def test_tpu_watch_recreates_the_slice_until_the_job_finishes(fake_pod: dict[str, str]) -> None:
    """The job exits 75 (preempted, saved), then the slice is preempted under the next one, then
    the third finishes: two recreations, setup and the same command each time."""
    result = watch(fake_pod, ["75", "preempt", "0"])
    assert result.returncode == 0, result.stderr
    assert verbs(fake_pod) == ["create", "delete", "create", "delete", "create"]
    assert "the job was preempted (exit 75, state saved): recreating the slice (restart 1" in (
        result.stdout
    )
    assert "the slice PREEMPTED: recreating the slice (restart 2 of at most 10)" in result.stdout
    assert result.stdout.rstrip().endswith("watch: the job finished (exit 0)")
    for w in range(2):
        argv = (worker_home(fake_pod, w) / "argv").read_text().split()
        assert argv[:3] == ["-m", "jobs.fit", "--distributed=on"]
        assert (worker_home(fake_pod, w) / "preflight.argv").exists()
        assert len(Path(fake_pod["FAKE_CLOUD_DIR"], f"runs-worker{w}").read_text()) == 3


def test_tpu_watch_stops_on_bad_input_and_after_max_restarts(fake_pod: dict[str, str]) -> None:
    bad = watch(fake_pod, ["2"])
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1].startswith("error: the job stopped on bad input (exit 2)")
    assert verbs(fake_pod) == ["create"]

    Path(fake_pod["FAKE_GCLOUD_LOG"]).unlink()
    for runs in Path(fake_pod["FAKE_CLOUD_DIR"]).glob("runs-worker*"):
        runs.unlink()
    capped = watch(fake_pod, ["75", "75"], MAX_RESTARTS="1", PREFLIGHT="0")
    assert capped.returncode == 75
    assert "after 1 restarts (MAX_RESTARTS)" in capped.stderr.splitlines()[-1]
    assert verbs(fake_pod) == ["delete", "create"]  # the slice of the first watch, then one restart
    assert not (worker_home(fake_pod, 0) / "preflight.argv").exists()


def test_tpu_watch_leaves_a_stopped_job_stopped(fake_pod: dict[str, str]) -> None:
    """``stop`` while watch waits: the job saves and exits 75, and watch does not restart it."""
    git_head()
    env = {**fake_pod, "ACCELERATOR_TYPE": "v5p-16", "RUNTIME_VERSION": "v2-alpha-tpuv5"}
    watching = subprocess.Popen(
        ["bash", str(REPO / "launch" / "tpu_pod.sh"), "watch", "jobs.fit", "--workdir=gs://b/w"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for w in range(2):
            wait_for(worker_home(fake_pod, w) / "argv")
        stopped = tpu_pod(fake_pod, "stop")
        assert stopped.returncode == 0 and stopped.stdout.count("stopped (exit 75)") == 2
        out, _ = watching.communicate(timeout=60)
    finally:
        if watching.poll() is None:
            watching.kill()
    assert watching.returncode == 75
    assert out.rstrip().endswith(
        "watch: the job was stopped (launch/tpu_pod.sh stop); not restarting"
    )
    assert verbs(fake_pod) == ["create"]


def sbatch_options(path: Path) -> list[str]:
    return [
        ln.split(None, 1)[1] for ln in path.read_text().splitlines() if ln.startswith("#SBATCH")
    ]


@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """The environment of a batch step: stubbed srun and scontrol, and the repository as a shared
    filesystem would hold it (the batch script and a set-up .venv) in ``SLURM_SUBMIT_DIR``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write(bin_dir / "srun", FAKE_SRUN)
    _write(bin_dir / "scontrol", FAKE_SCONTROL)
    shared = tmp_path / "shared"
    (shared / "launch").mkdir(parents=True)
    shutil.copy(REPO / "launch" / "gpu_slurm.sbatch", shared / "launch")
    (shared / ".venv" / "bin").mkdir(parents=True)
    _write(shared / ".venv" / "bin" / "python", "#!/bin/sh\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for name in ("MAX_REQUEUES", "PREFLIGHT"):
        env.pop(name, None)
    return {
        **env,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_SRUN_LOG": str(tmp_path / "srun.log"),
        "FAKE_SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "SLURM_SUBMIT_DIR": str(shared),
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_CPUS_PER_TASK": "12",
        "SLURM_JOB_ID": "4242",
    }


SLURM_ARGS = ("jobs.arnoldi", "--config=configs/mnist.py:pod", "--workdir=/shared/w")


def sbatch(env: dict[str, str], **overrides: str) -> subprocess.CompletedProcess:
    """The batch script as the batch step runs it; ``env`` is fake_slurm's, after a reset of the
    stubs' records."""
    for log in ("FAKE_SRUN_LOG", "FAKE_SCONTROL_LOG"):
        Path(env[log]).unlink(missing_ok=True)
    return subprocess.run(
        ["bash", str(Path(env["SLURM_SUBMIT_DIR"]) / "launch" / "gpu_slurm.sbatch"), *SLURM_ARGS],
        env={**env, **overrides},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_slurm_script_uses_the_documented_interfaces(fake_slurm: dict[str, str]) -> None:
    """GPUs per node (every task sees its node's GPUs; JAX picks GPU SLURM_LOCALID), an early
    SIGTERM sized for a save, requeueing allowed with the log appended to, --cpus-per-task passed
    to srun, a per-node check of the venv, the preflight on every task before the job."""
    options = sbatch_options(REPO / "launch" / "gpu_slurm.sbatch")
    assert "--gpus-per-node=8" in options and "--ntasks-per-node=8" in options
    assert not any(o.startswith("--gpus-per-task") for o in options)
    (signal_option,) = [o for o in options if o.startswith("--signal=")]
    assert re.fullmatch(r"--signal=TERM@(\d+)", signal_option)
    assert int(signal_option.rsplit("@", 1)[1]) >= 300
    assert "--requeue" in options and "--open-mode=append" in options

    result = sbatch(fake_slurm)
    assert result.returncode == 0, result.stderr
    check, preflight, job = recorded_calls(Path(fake_slurm["FAKE_SRUN_LOG"]))
    assert "--nodes=2" in check and "--ntasks-per-node=1" in check
    for step in (preflight, job):
        assert "--kill-on-bad-exit=1" in step and "--cpus-per-task=12" in step
    assert preflight[preflight.index(".venv/bin/python") :] == [
        ".venv/bin/python",
        "-m",
        "jobs.preflight",
        "--distributed=on",
        "--workdir=/shared/w",
    ]
    assert job[job.index(".venv/bin/python") :] == [
        ".venv/bin/python",
        "-m",
        "jobs.arnoldi",
        "--distributed=on",
        "--config=configs/mnist.py:pod",
        "--workdir=/shared/w",
    ]
    assert not Path(fake_slurm["FAKE_SCONTROL_LOG"]).exists()

    assert sbatch(fake_slurm, PREFLIGHT="0").returncode == 0
    assert len(recorded_calls(Path(fake_slurm["FAKE_SRUN_LOG"]))) == 2  # no preflight step
    bad = sbatch(fake_slurm, FAKE_PREFLIGHT_RC="2")
    assert bad.returncode == 2 and len(recorded_calls(Path(fake_slurm["FAKE_SRUN_LOG"]))) == 2
    # A node that cannot see the venv: the per-node check stops the job before it starts.
    shutil.rmtree(Path(fake_slurm["SLURM_SUBMIT_DIR"]) / ".venv")
    missing = sbatch(fake_slurm)
    assert missing.returncode == 2 and "cannot see" in missing.stderr
    assert len(recorded_calls(Path(fake_slurm["FAKE_SRUN_LOG"]))) == 1  # the check only
    wrong_dir = sbatch(fake_slurm, SLURM_SUBMIT_DIR=str(Path(fake_slurm["FAKE_SRUN_LOG"]).parent))
    assert wrong_dir.returncode == 2 and "submit from there" in wrong_dir.stderr


def test_slurm_requeues_a_preempted_job_up_to_max_requeues(fake_slurm: dict[str, str]) -> None:
    def requeues() -> list[list[str]]:
        return recorded_calls(Path(fake_slurm["FAKE_SCONTROL_LOG"]))

    preempted = sbatch(fake_slurm, FAKE_JOB_RC="75")
    assert preempted.returncode == 75 and requeues() == [["requeue", "4242"]]
    assert "requeueing job 4242 (requeue 1 of at most 20)" in preempted.stdout
    again = sbatch(fake_slurm, FAKE_JOB_RC="75", SLURM_RESTART_COUNT="19")
    assert again.returncode == 75 and requeues() == [["requeue", "4242"]]
    for count, cap in (("20", None), ("2", "2")):
        overrides = {"FAKE_JOB_RC": "75", "SLURM_RESTART_COUNT": count}
        if cap is not None:
            overrides["MAX_REQUEUES"] = cap
        capped = sbatch(fake_slurm, **overrides)
        assert capped.returncode == 75 and requeues() == []
        (line,) = capped.stderr.splitlines()
        assert f"after {count} requeues, the most MAX_REQUEUES={cap or 20} allows" in line
        assert "resubmit the same command to resume" in line
    for code in ("0", "1", "2"):
        other = sbatch(fake_slurm, FAKE_JOB_RC=code)
        assert other.returncode == int(code) and requeues() == []


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
