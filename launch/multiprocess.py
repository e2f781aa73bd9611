r"""Run one job as N local processes of k fake CPU devices each, joined by jax.distributed.

A real multi-controller cluster on one machine (127.0.0.1 only): every process runs the same
command, as on a pod or a GPU cluster, and finds its coordinator, index and device count in the
``INFLUENCE_*`` environment (parallel/distributed.py). Use it to try multi-host runs and
topology changes on a laptop:

  python -m launch.multiprocess --num_processes=2 --devices_per_process=2 -- \
      python -m jobs.arnoldi --config=configs/mnist.py:runlocal --workdir=workdirs/mp

Each output line is prefixed with its process index. When a process fails, the others get
``--grace_secs`` to stop on their own (the distributed runtime's heartbeat makes them fail) before
they are killed. The exit code is the first failing process' code, or 0 (a signal as 128 + its
number, as a shell reports it).
"""

import dataclasses
import os
import signal
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


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How each process of a launch ended.

    Attributes:
      codes: exit code of process i (a signal as a negative number, ``TIMED_OUT`` if the launcher
        killed it).
      ended_s: seconds from the start of the launch to process i's exit.
      first_failed: the first process seen exiting non-zero, or None.
    """

    codes: tuple[int, ...]
    ended_s: tuple[float, ...]
    first_failed: int | None

    @property
    def exit_code(self) -> int:
        """The job's code: the first failing process' code, else 0."""
        return 0 if self.first_failed is None else self.codes[self.first_failed]


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
) -> Outcome:
    """Start the processes, stream their prefixed output to ``sink``, wait for all of them.

    ``env`` adds variables to every process' environment. Once a process fails the others get
    ``grace_secs`` to stop on their own; past that, or past ``timeout_secs``, the launcher kills
    what is left (each process with everything it started: a job's supervisor and its child) and
    records ``TIMED_OUT`` for it.
    """
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
            start_new_session=True,  # its own process group, so a kill reaches its children
        )
        for i in range(num_processes)
    ]
    threads = [
        threading.Thread(target=_forward, args=(i, p.stdout, sink), daemon=True)
        for i, p in enumerate(procs)
    ]
    for t in threads:
        t.start()
    codes: list[int | None] = [None] * num_processes
    ended = [0.0] * num_processes
    first_failed, deadline = None, None if timeout_secs is None else started + timeout_secs
    while any(code is None for code in codes):
        for i, p in enumerate(procs):
            if codes[i] is None and p.poll() is not None:
                codes[i], ended[i] = p.returncode, time.monotonic() - started
                if p.returncode and first_failed is None:
                    first_failed = i
                    deadline = min(deadline or float("inf"), time.monotonic() + grace_secs)
        if deadline is not None and time.monotonic() > deadline:
            for i, p in enumerate(procs):
                if codes[i] is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                    codes[i], ended[i] = TIMED_OUT, time.monotonic() - started
                    first_failed = i if first_failed is None else first_failed
                    sink.write(f"[launch] killed process {i}: {KILLED_REASON}\n")
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=5)
    return Outcome(tuple(codes), tuple(ended), first_failed)


def define_flags() -> dict[str, flags.FlagHolder]:
    """The launcher's own flags; defined only when it runs as a program, so that importing this
    module (tests do) never clashes with a job's flags of the same name (--num_processes)."""
    return {
        "num_processes": flags.DEFINE_integer("num_processes", 2, "Processes to start."),
        "devices": flags.DEFINE_integer(
            "devices_per_process", 1, "Fake CPU devices in each process."
        ),
        "port": flags.DEFINE_integer(
            "port", 0, "Coordinator port on 127.0.0.1 (0: pick a free one)."
        ),
        "grace": flags.DEFINE_float(
            "grace_secs",
            60.0,
            "After a process fails, how long the others may take to stop on their own.",
        ),
    }


def main(argv: list[str], options: dict[str, flags.FlagHolder]) -> None:
    if len(argv) < 2:
        raise app.UsageError("give the command to run after --")
    code = launch(
        argv[1:],
        options["num_processes"].value,
        options["devices"].value,
        options["port"].value,
        options["grace"].value,
    ).exit_code
    sys.exit(128 - code if code < 0 else code)


if __name__ == "__main__":
    _options = define_flags()
    app.run(lambda argv: main(argv, _options))
