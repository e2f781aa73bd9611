r"""Run one job as N local processes of k fake CPU devices each, joined by jax.distributed.

A real multi-controller cluster on one machine (127.0.0.1 only): every process runs the same
command, as on a pod or a GPU cluster, and finds its coordinator, index and device count in the
``INFLUENCE_*`` environment (parallel/distributed.py). Use it to try multi-host runs and
topology changes on a laptop:

  python -m launch.multiprocess --num_processes=2 --devices_per_process=2 -- \
      python -m jobs.arnoldi --config=configs/mnist.py:runlocal --workdir=workdirs/mp

Each output line is prefixed with its process index. When a process fails, the others get
``--grace_secs`` to stop on their own (the distributed runtime's heartbeat makes them fail) before
they are killed. The exit code is the first failing process' code, or 0.
"""

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from absl import app, flags

from parallel import distributed

TIMED_OUT = 124
KILLED_REASON = "still running after the grace period or the time limit"

_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 1, "Fake CPU devices in each process.")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: pick a free one).")
_GRACE = flags.DEFINE_float(
    "grace_secs", 60.0, "After a process fails, how long the others may take to stop on their own."
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, num_processes: int, devices: int, port: int) -> dict[str, str]:
    """The environment of process ``index``: CPU platform, its fake devices, the coordinator."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        {
            "JAX_PLATFORMS": "cpu",
            distributed.ENV_COORDINATOR: f"127.0.0.1:{port}",
            distributed.ENV_NUM_PROCESSES: str(num_processes),
            distributed.ENV_PROCESS_ID: str(index),
            distributed.ENV_NUM_CPU_DEVICES: str(devices),
        }
    )
    return env


def _forward(index: int, stream, sink) -> None:
    for line in iter(stream.readline, ""):
        sink.write(f"[{index}] {line}")
        sink.flush()


def launch(
    command: Sequence[str],
    num_processes: int,
    devices: int,
    port: int = 0,
    grace_secs: float = 60,
    sink: TextIO = sys.stdout,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout_secs: float | None = None,
) -> int:
    """Start the processes, stream their prefixed output to ``sink``, and return the job's exit
    code: the code of the first process seen failing (a signal as a negative number), else 0.
    ``env`` adds variables to every process' environment. Past ``timeout_secs`` every process is
    killed and the code is ``TIMED_OUT``."""
    port = port or free_port()
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            list(command),
            cwd=cwd,
            env={**process_env(i, num_processes, devices, port), **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    threads = [
        threading.Thread(target=_forward, args=(i, p.stdout, sink), daemon=True)
        for i, p in enumerate(procs)
    ]
    for t in threads:
        t.start()
    first_failure, deadline = 0, None
    if timeout_secs is not None:
        deadline = started + timeout_secs
    while any(p.poll() is None for p in procs):
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if failed and not first_failure:
            first_failure = failed[0]
            deadline = min(deadline or float("inf"), time.monotonic() + grace_secs)
        if deadline is not None and time.monotonic() > deadline:
            first_failure = first_failure or TIMED_OUT
            for i, p in enumerate(procs):
                if p.poll() is None:
                    p.kill()
                    sink.write(f"[launch] killed process {i}: {KILLED_REASON}\n")
        time.sleep(0.1)
    for t in threads:
        t.join(timeout=5)
    return first_failure or next((p.returncode for p in procs if p.returncode), 0)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise app.UsageError("give the command to run after --")
    sys.exit(launch(argv[1:], _NUM_PROCESSES.value, _DEVICES.value, _PORT.value, _GRACE.value))


if __name__ == "__main__":
    app.run(main)
