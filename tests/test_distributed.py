"""The multi-process runtime's settings (parallel/distributed.py): ``--distributed=auto`` starts
``jax.distributed`` exactly when JAX can configure the job, and says what is missing otherwise."""

import os
import subprocess

import pytest
from jax._src import clusters

from launch import multiprocess
from parallel import distributed
from tests.pipeline_helpers import CLUSTER_PREFIXES, REPO, job_command, job_env


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment without any cluster variable (CI may run under a scheduler)."""
    for var in list(os.environ):
        if var.startswith(CLUSTER_PREFIXES) or var in ("KUBERNETES_SERVICE_HOST",):
            monkeypatch.delenv(var)
    return monkeypatch


def srun_step(task: int, num_tasks: int, port: int) -> dict[str, str]:
    """The variables srun gives task ``task`` of a one-node step on this machine."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "127.0.0.1",
        "SLURM_NTASKS": str(num_tasks),
        "SLURM_PROCID": str(task),
        "SLURM_LOCALID": str(task),
        "JAX_COORDINATOR_PORT": str(port),
    }


def test_flags_win_over_environment(no_cluster: pytest.MonkeyPatch) -> None:
    no_cluster.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:1234")
    no_cluster.setenv(distributed.ENV_NUM_PROCESSES, "4")
    no_cluster.setenv(distributed.ENV_PROCESS_ID, "3")
    no_cluster.setenv(distributed.ENV_NUM_CPU_DEVICES, "2")
    runtime = distributed.Runtime.from_env(process_id=1, heartbeat_timeout_s=7)
    assert runtime.coordinator_address == "127.0.0.1:1234"
    assert (runtime.num_processes, runtime.process_id, runtime.num_cpu_devices) == (4, 1, 2)
    assert runtime.heartbeat_timeout_s == 7 and runtime.wants_distributed()
    runtime.validate()


def test_no_cluster_runs_one_process(no_cluster: pytest.MonkeyPatch) -> None:
    """Nothing to join: auto and off stay single-process; on says there is nothing to join."""
    assert distributed.detect_cluster() is None
    assert not distributed.Runtime().wants_distributed()
    assert not distributed.Runtime(mode="off").wants_distributed()
    with pytest.raises(distributed.DistributedError, match="no cluster that JAX can configure"):
        distributed.Runtime(mode="on").wants_distributed()


def test_srun_step_is_what_jax_detects(no_cluster: pytest.MonkeyPatch) -> None:
    """In an srun step JAX's SLURM detector applies: auto starts the runtime for 2+ tasks and not
    for one; ``off`` wins."""
    for var, value in srun_step(0, 2, 1).items():
        no_cluster.setenv(var, value)
    assert distributed.detect_cluster() is clusters.SlurmCluster
    assert distributed.Runtime().wants_distributed()
    assert not distributed.Runtime(mode="off").wants_distributed()
    no_cluster.setenv("SLURM_NTASKS", "1")
    assert not distributed.Runtime().wants_distributed()
    assert distributed.Runtime(mode="on").wants_distributed()


def test_salloc_shell_says_what_is_missing(no_cluster: pytest.MonkeyPatch) -> None:
    """A SLURM allocation of 8 tasks outside srun: JAX cannot configure it (its detector needs the
    step's node list), so auto stops with what to do instead of a traceback from JAX."""
    no_cluster.setenv("SLURM_JOB_ID", "4242")
    no_cluster.setenv("SLURM_NTASKS", "8")
    assert not clusters.SlurmCluster.is_env_present()
    for mode in ("auto", "on"):
        with pytest.raises(distributed.DistributedError, match="not in an srun step"):
            distributed.Runtime(mode=mode).wants_distributed()
    assert not distributed.Runtime(mode="off").wants_distributed()


def test_open_mpi_5_says_what_is_missing(no_cluster: pytest.MonkeyPatch) -> None:
    no_cluster.setenv("OMPI_COMM_WORLD_SIZE", "4")
    no_cluster.setenv("OMPI_COMM_WORLD_RANK", "0")
    with pytest.raises(distributed.DistributedError, match="Open MPI launch of 4 processes"):
        distributed.Runtime().wants_distributed()
    no_cluster.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")
    assert distributed.detect_cluster() is clusters.OmpiCluster
    assert distributed.Runtime().wants_distributed()


def test_any_jax_detector_is_consulted(no_cluster: pytest.MonkeyPatch) -> None:
    """A cluster JAX knows (here a stand-in for a Cloud TPU VM pod, which JAX reads from the
    metadata server) starts the runtime in auto mode when it has several processes."""
    no_cluster.setattr(clusters.ClusterEnv, "_cluster_types", [])

    class FakePod(clusters.ClusterEnv):  # registers itself in the (patched) list
        processes = 4

        @classmethod
        def is_env_present(cls) -> bool:
            return True

        @classmethod
        def get_process_count(cls) -> int:
            return cls.processes

    assert distributed.detect_cluster() is FakePod
    assert distributed.Runtime().wants_distributed()
    FakePod.processes = 1
    assert not distributed.Runtime().wants_distributed()


def test_one_gpu_bound_per_task(no_cluster: pytest.MonkeyPatch) -> None:
    """``--gpus-per-task=1`` leaves each task one GPU, which it sees as device 0: asking for
    device SLURM_LOCALID (JAX's default) would find none."""
    no_cluster.setenv("SLURM_LOCALID", "5")
    no_cluster.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert distributed._bound_gpu() == [0]
    no_cluster.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert distributed._bound_gpu() is None
    no_cluster.setenv("CUDA_VISIBLE_DEVICES", "5")
    no_cluster.setenv("JAX_LOCAL_DEVICE_IDS", "5")
    assert distributed._bound_gpu() is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_processes": 2}, "give all three of --coordinator_address"),
        (
            {"coordinator_address": "127.0.0.1:1", "num_processes": 2, "process_id": 2},
            r"--process_id=2 must be in \[0, --num_processes=2\)",
        ),
        ({"num_cpu_devices": -1}, "--num_cpu_devices=-1 must be >= 0"),
    ],
)
def test_contradictory_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.Runtime(**settings).validate()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({distributed.ENV_NUM_PROCESSES: "two"}, "bad INFLUENCE_* environment variable"),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, "not in an srun step"),
    ],
    ids=["bad-variable", "salloc-shell"],
)
def test_bad_environment_is_one_line(tmp_path, env: dict, message: str) -> None:
    """A job started with half a cluster description stops with one line, before JAX starts."""
    result = subprocess.run(
        job_command("arnoldi", tmp_path),
        cwd=REPO,
        env=job_env(env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in result.stderr


@pytest.mark.slow
def test_srun_step_forms_one_job(tmp_path) -> None:
    """Two processes started the way srun starts them (SLURM variables only, no coordinator
    given): ``--distributed=auto`` joins them into one 2-process job, as JAX would."""
    port = multiprocess.free_port()
    procs = [
        subprocess.Popen(
            [*job_command("evaluate", tmp_path / "w"), "--num_cpu_devices=1"],
            cwd=REPO,
            env=job_env(srun_step(task, 2, port)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for task in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, output in zip(procs, outputs, strict=True):
        # Both joined (the job logs its process count), then stopped at the missing scores.
        assert proc.returncode == 2, output[-2000:]
        assert "no scores in" in output.strip().splitlines()[-1]
    assert "2 processes" in outputs[0], outputs[0][-2000:]
