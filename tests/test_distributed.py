"""The multi-process runtime's settings (parallel/distributed.py): checked before anything starts."""

import pytest

from parallel import distributed
from tests.pipeline_helpers import run_job


def test_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
    monkeypatch.setenv(distributed.ENV_NUM_CPU_DEVICES, "2")
    runtime = distributed.Runtime.from_env(process_id=1, heartbeat_timeout_s=7)
    assert runtime.coordinator_address == "127.0.0.1:1234"
    assert (runtime.num_processes, runtime.process_id, runtime.num_cpu_devices) == (4, 1, 2)
    assert runtime.heartbeat_timeout_s == 7 and runtime.wants_distributed()
    runtime.validate()


def test_auto_mode_stays_single_process_without_a_cluster(monkeypatch) -> None:
    for var in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.Runtime().wants_distributed()
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert distributed.Runtime().wants_distributed()
    assert not distributed.Runtime(mode="off").wants_distributed()


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


def test_bad_environment_is_one_line(tmp_path) -> None:
    """A job started with half a cluster description stops with one line, before JAX starts."""
    result = run_job("arnoldi", tmp_path, env={distributed.ENV_NUM_PROCESSES: "two"})
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: bad INFLUENCE_* environment variable")
        and "Traceback" not in result.stderr
    )
