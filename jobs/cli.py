"""What every job binary does: flags, platform set-up, and one-line errors for bad input.

A job is ``cli.main(["pipeline.<stage>", ...])``; each stage is a module's ``run(config,
workdir)``. Bad input (an unknown config field, an impossible value, a missing or incompatible
checkpoint) ends the process with one line on stderr, ``error: ...``, and exit code 2, before any
expensive work.
"""

import functools
import importlib
import logging as logging_std
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax
import ml_collections
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from parallel import distributed, supervisor
from runtime import failpoints, preemption, profile, storage
from runtime import workdir as wd
from runtime.errors import UserError

Stage = Callable[[ml_collections.ConfigDict, epath.PathLike], Any]

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file[:presets], e.g. configs/mnist.py:model=flax_cnn."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory (local or gs://) for all state and outputs."
)
# The multi-process runtime (parallel/distributed.py): unset flags fall back to INFLUENCE_* vars.
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    list(distributed.MODES),
    "Start jax.distributed: auto (when a coordinator or a TPU/SLURM/MPI cluster is found), on, off.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, f"host:port of process 0 (or ${distributed.ENV_COORDINATOR})."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, f"Processes in the job (or ${distributed.ENV_NUM_PROCESSES})."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, f"This process' index (or ${distributed.ENV_PROCESS_ID})."
)
_PROFILE_STEPS = flags.DEFINE_string(
    "profile_steps",
    "",
    "a:b: a jax.profiler trace of steps a to b of every loop into <workdir>/profile/<loop>/.",
)
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices",
    None,
    f"Fake CPU devices per process (or ${distributed.ENV_NUM_CPU_DEVICES}).",
)
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_secs",
    100,
    "A process silent this long is declared dead and every other process stops with an error.",
)


# How long an at-once exit waits, with stdout/stderr already on /dev/null, for writes that other
# threads began before to finish, so the error line lands after them.
_DRAIN_SECS = 0.2


def fail(message: str, code: int = 2, at_once: bool = False) -> None:
    """One line on stderr and exit ``code``. ``at_once`` skips interpreter shutdown, where a
    failed run's background work would print more (Orbax's orphaned write tasks) or wait (the
    distributed shutdown barrier, for a process that is gone), so the line stays the last one.

    With ``at_once`` the line is also the last one against threads that are still running: when
    a peer dies, Orbax's background commit thread can time out at its barrier while the main
    thread's collective fails, and it logs a traceback. So stdout and stderr are pointed at
    /dev/null first, and the line goes to a duplicate of the original stderr after a pause: a
    write another thread had already begun on the old stderr still lands there, and the pause
    lets it finish before the line (a CI run saw one land after it without the pause)."""
    line = f"error: {' '.join(message.split())}\n"
    if not at_once:
        sys.stderr.write(line)
        sys.stderr.flush()
        sys.exit(code)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    original = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    time.sleep(_DRAIN_SECS)
    os.write(original, line.encode())
    os._exit(code)


# What storage failures look like: an OSError, or tensorstore's ValueError carrying the OS message.
def _last_line(e: BaseException) -> str:
    """The informative line of a config_flags error (it embeds tracebacks and escaped newlines)."""
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if any(ln.startswith("Traceback") for ln in lines):
        lines = [lines[0].split("Error whilst")[0] + lines[-1]]
    line = " ".join(lines)
    return line[1:-1] if len(line) > 1 and line[0] == line[-1] == "'" else line


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but an unknown or ill-typed --config.* override is one line, not a traceback
    (config_flags raises AttributeError/KeyError/TypeError for those)."""
    try:
        rest = flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        fail(f"unknown config field: {_last_line(e)}")
    except Exception as e:  # every parse failure is a user error
        text = str(e).replace("\\n", "\n")
        if "Failed loading config file" in text:  # an override read the unloadable config
            fail(
                f"cannot load --config={_config_arg(argv)}: {text.strip().splitlines()[-1].strip()}"
            )
        fail(f"bad command line: {_last_line(e)}")
    for name in ("config", "workdir"):
        if flags.FLAGS[name].value is None:
            fail(f"--{name} is required")
    _config_load_failure()
    return rest


def _config_load_failure() -> None:
    """One line naming the file when --config could not be loaded (missing, or an error inside
    it): config_flags keeps the failure as a stand-in value and raises only when it is read."""
    config = flags.FLAGS["config"].value
    if config is None or isinstance(config, ml_collections.ConfigDict):
        return
    try:
        config.to_dict()
    except Exception as e:
        cause = e.__cause__ or e
        last = [ln.strip() for ln in str(cause).splitlines() if ln.strip()][-1:]
        fail(
            f"cannot load --config={flags.FLAGS['config'].config_filename}: "
            f"{' '.join(last) or type(cause).__name__}"
        )


def _config_arg(argv: list[str]) -> str:
    """The file part of ``--config=<file>[:presets]`` (or ``--config <file>``) in ``argv``."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.removeprefix("--config=").split(":")[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
    return "?"


class _QuietLibraries(logging_std.Filter):
    """Drop INFO chatter of Orbax (dozens of lines per save); its warnings and errors still show."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno > logging_std.INFO or "/orbax/" not in record.pathname


def run_stages(
    stages: Sequence[Stage],
    config: ml_collections.ConfigDict,
    workdir: str,
    checks: Sequence[Callable[[ml_collections.ConfigDict, Any], None]] = (),
) -> None:
    """Run ``stages`` in order after ``checks`` (``stage.check_all``); user errors exit 2 with
    one line. Process 0 alone logs at INFO."""
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if jax.process_index() > 0:
        logging.set_verbosity(logging.WARNING)
    logging.info(
        "JAX %s, %d processes, devices: %s", jax.__version__, jax.process_count(), jax.devices()
    )
    if config:
        logging.info("config:\n%s", config)
    preemption.install_handler()
    try:
        if checks:
            from stages import setup as stage_lib

            stage_lib.check_all(config, checks)
        profile.configure(workdir, _PROFILE_STEPS.value if flags.FLAGS.is_parsed() else "")
        wd.ensure_writable(workdir)
        wd.ensure_shared(workdir)
        for index, stage in enumerate(stages, start=1):
            failpoints.maybe_fail("stage", index)  # a notice between two stages (tests)
            stage(config, workdir)
    except UserError as e:
        fail(str(e))
    except preemption.Preempted as e:
        logging.warning(
            "%s; exiting %d: run the same command again to continue", e, preemption.EXIT_CODE
        )
        logging.flush()
        sys.exit(preemption.EXIT_CODE)
    except (jax.errors.JaxRuntimeError, TimeoutError) as e:
        # Multi-process: a collective or a barrier (Orbax's async-save commit waits on one) that
        # fails or times out means a peer is gone.
        if jax.process_count() == 1:
            raise
        _lost_peer(e)
    except Exception as e:
        if storage.refusal(e) is not None:  # a gs:// (or local) workdir that says no, mid-run
            fail(storage.refused_message(workdir, str(storage.refusal(e))), at_once=True)
        if not isinstance(e, (OSError, ValueError)) or not storage.full(e):
            raise
        fail(
            f"writing to --workdir={workdir} failed: the disk is full or over quota; "
            "complete checkpoints are intact and a half-written one is ignored: free space and "
            "run the same command again to resume",
            code=1,
            at_once=True,
        )


def _lost_peer(e: BaseException) -> None:
    """A collective failed in a multi-process job: almost always another process died.

    Exit at once: the atexit handlers would wait for the dead process at the distributed shutdown
    barrier (or until the heartbeat timeout aborts this process). What was checkpointed stays;
    re-running resumes from it.
    """
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    line = supervisor.lost_peer_line(
        jax.process_index(), jax.process_count(), f"a collective failed ({first})"
    )
    fail(line.removeprefix("error: "), code=1, at_once=True)


def start_runtime() -> None:
    """Join the job's processes from the flags (or the cluster's variables), under a supervisor
    when several; a bad setting is one line, exit 2."""
    try:
        runtime = distributed.Runtime.from_env(
            mode=_DISTRIBUTED.value,
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
            num_cpu_devices=_NUM_CPU_DEVICES.value,
            heartbeat_timeout_s=_HEARTBEAT.value,
        )
        runtime.validate()
        if supervisor.is_supervised():
            supervisor.die_with_supervisor()
        elif runtime.wants_distributed():
            supervisor.run_supervised(*runtime.identity())
        runtime.initialize()
    except distributed.DistributedError as e:
        fail(str(e))


def main(stage_modules: Sequence[str], options: Callable[[], dict[str, Any]] | None = None) -> None:
    """The body of every ``jobs/*.py``: parse flags, then run the stages, each the ``run`` of a
    module named here (``"stages.fit"``). ``options``: keyword arguments of every stage's
    ``run`` beyond the config and workdir, read from the job's own flags once they are parsed
    (``jobs.explain``'s prompts).

    The stage modules are imported only once the process knows it runs them: a multi-process
    job's supervisor (``parallel/supervisor.py``) never does, so it stays a small process (1 s and
    190 MB to start, against 7.5 s and 810 MB with TensorFlow and the rest).
    """

    def _main(argv: list[str]) -> None:
        if len(argv) > 1:
            fail(f"unexpected arguments: {argv[1:]}")
        start_runtime()
        modules = [importlib.import_module(name) for name in stage_modules]
        checks = [m.CHECK for m in modules if hasattr(m, "CHECK")] if len(modules) > 1 else []
        kwargs = options() if options is not None else {}
        stages = [functools.partial(m.run, **kwargs) for m in modules]
        run_stages(stages, _CONFIG.value, _WORKDIR.value, checks)

    app.run(_main, flags_parser=_parse_flags)
