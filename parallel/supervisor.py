"""A multi-process job's process runs as a child of a small supervisor, so every way it can end
reaches the user as the project's one line.

When a process of a ``jax.distributed`` job dies, the others end in one of two ways: a collective
they are in fails (a Python exception; ``jobs/cli.py`` prints the project's line and exits 1),
or JAX's coordination client learns of the failure first (the coordinator is gone, or the
heartbeat timed out) and aborts the process from C++ (``LOG(QFATAL)``, SIGABRT), which no Python
code in that process can intercept; which of the two comes first is a race. The supervisor,
the process the user started, runs the same command as a child with the same stdin, stdout and
stderr, forwards SIGTERM, and on the child's exit:

- exits with the child's code (0 after a preemption save, 1 or 2 after an error line);
- after a SIGABRT, prints ``error: process i of N: ...`` and exits 1 like the collective path;
- after another signal (SIGKILL: an OOM kill, a failpoint), dies of the same signal.

Single-process jobs run without it.
"""

import ctypes
import faulthandler
import os
import signal
import subprocess
import sys
import types

ENV_SUPERVISED = "INFLUENCE_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def lost_peer_line(process: int | str, num_processes: int | str, detail: str) -> str:
    """The line every survivor of a dead process prints (README, "What happens when…")."""
    return (
        f"error: process {process} of {num_processes}: {detail}, most likely because another "
        "process of the job died; run the same command again to resume from the last checkpoint"
    )


def is_supervised() -> bool:
    """Whether this process is the child of a supervisor (which then set ``ENV_SUPERVISED``)."""
    return ENV_SUPERVISED in os.environ


def die_with_supervisor() -> None:
    """In the child: be killed with the supervisor (a scheduler that SIGKILLs the process it
    started must not leave the job running), by Linux's PR_SET_PDEATHSIG.

    Also make a fatal signal dump only the thread that received it: absl enables
    ``faulthandler`` for all threads, and when JAX's runtime aborts the process from one of its
    C++ threads, walking the other Python threads' frames can itself crash (seen once in CI: a
    SIGSEGV while the main thread was inside an import), so the child died of SIGSEGV instead of
    SIGABRT and the supervisor, rightly taking that for a crash, re-raised it instead of printing
    the lost-peer line."""
    faulthandler.enable(all_threads=False)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):  # not Linux: the supervisor's death leaves the child be
        return
    if os.getppid() != int(os.environ[ENV_SUPERVISED]):  # it died before prctl took effect
        os._exit(1)


def run_supervised(process: str, num_processes: str) -> None:
    """Run this process' own command line as a child and end as described above (never returns).

    ``process`` and ``num_processes`` only label the error line.
    """
    child = subprocess.Popen(
        [sys.executable, *sys.orig_argv[1:]], env={**os.environ, ENV_SUPERVISED: str(os.getpid())}
    )

    def forward(signum: int, frame: types.FrameType | None) -> None:
        del frame
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the child itself
    code = child.wait()
    if code >= 0:
        os._exit(code)
    if -code == signal.SIGABRT:
        detail = "JAX's distributed runtime stopped this process (SIGABRT, see the lines above)"
        print(lost_peer_line(process, num_processes, detail), file=sys.stderr, flush=True)
        os._exit(1)
    if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be handled anyway
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
    os._exit(128 - code)  # not reached for a fatal signal
