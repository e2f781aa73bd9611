"""The multi-controller runtime: one process per host (or GPU), all running the same program.

``jax.distributed.initialize`` must run before anything touches a device. ``--distributed=auto``
(the default) starts it exactly when JAX itself can configure the job:

- explicit settings: ``--coordinator_address --num_processes --process_id`` (or the
  ``INFLUENCE_*`` variables below, which ``launch/multiprocess.py`` sets, or JAX's own
  ``JAX_COORDINATOR_ADDRESS``);
- a cluster that JAX's auto-detection recognises with more than one process: an ``srun`` step of
  SLURM, a Cloud TPU VM pod slice (read from the metadata server), an Open MPI 4 (ORTE) launch, a
  Kubernetes job. The detectors are JAX's own (``jax._src.clusters``), asked in JAX's order, so
  ``auto`` and ``jax.distributed.initialize()`` never disagree.

Otherwise the job runs as one process, unless the environment looks like a multi-process launch
that JAX cannot configure (a SLURM allocation outside ``srun``, an Open MPI 5 launch): then one line
says what is missing. ``--distributed=on`` insists on the runtime and fails the same way when there
is nothing to join; ``off`` never starts it.

The heartbeat timeout bounds how long the survivors of a dead process wait before they fail: each
process pings the coordination service, and a process silent for longer is declared dead, which
makes every other process stop with an error instead of waiting forever in a collective.
"""

import dataclasses
import os

import jax

from influence.errors import UserError

ENV_COORDINATOR = "INFLUENCE_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "INFLUENCE_NUM_PROCESSES"
ENV_PROCESS_ID = "INFLUENCE_PROCESS_ID"
ENV_NUM_CPU_DEVICES = "INFLUENCE_NUM_CPU_DEVICES"
MODES = ("auto", "on", "off")


class DistributedError(UserError):
    """A distributed set-up that cannot work (missing or contradictory settings)."""


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How this process joins the job.

    Attributes:
      mode: "auto" (start the runtime if a coordinator or a cluster environment is found), "on"
        (always; JAX detects TPU/SLURM/MPI settings left as None), "off" (single process).
      coordinator_address: "host:port" of process 0's coordination service.
      num_processes: processes in the job.
      process_id: this process, in [0, num_processes).
      num_cpu_devices: fake CPU devices per process (local simulation and tests); 0 leaves the
        platform's devices alone.
      heartbeat_timeout_s: a process silent this long is declared dead and the others fail.
      initialization_timeout_s: how long to wait for every process to join.
      shutdown_timeout_s: how long a finishing process waits for the others at exit.
    """

    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    num_cpu_devices: int = 0
    heartbeat_timeout_s: int = 100
    initialization_timeout_s: int = 300
    shutdown_timeout_s: int = 300

    @classmethod
    def from_env(cls, **flags: object) -> "Runtime":
        """Flag values (None = not given) completed from the ``INFLUENCE_*`` environment."""
        env = os.environ

        def pick(name: str, var: str, cast: type) -> object:
            if flags.get(name) is not None:
                return flags[name]
            return cast(env[var]) if env.get(var) else None

        try:
            values = {
                "coordinator_address": pick("coordinator_address", ENV_COORDINATOR, str),
                "num_processes": pick("num_processes", ENV_NUM_PROCESSES, int),
                "process_id": pick("process_id", ENV_PROCESS_ID, int),
                "num_cpu_devices": pick("num_cpu_devices", ENV_NUM_CPU_DEVICES, int) or 0,
            }
        except ValueError as e:
            raise DistributedError(f"bad INFLUENCE_* environment variable: {e}") from e
        rest = {k: v for k, v in flags.items() if k not in values and v is not None}
        return cls(**values, **rest)

    def wants_distributed(self) -> bool:
        """Whether to start ``jax.distributed``, by the rules of the module docstring; raises
        ``DistributedError`` with what is missing when the launch cannot work."""
        if self.mode not in MODES:
            raise DistributedError(f"--distributed={self.mode!r}; choose one of {MODES}")
        if self.mode == "off":
            return False
        if self.coordinator_address is not None or os.environ.get("JAX_COORDINATOR_ADDRESS"):
            return True
        cluster = detect_cluster()
        if cluster is not None:
            return self.mode == "on" or cluster.get_process_count() > 1
        problem = _unusable_launch()
        if problem is None and self.mode == "on":
            problem = (
                "--distributed=on, but no cluster that JAX can configure was found (a SLURM srun "
                "step, a Cloud TPU VM pod slice, an Open MPI 4 launch, a Kubernetes job)"
            )
        if problem is not None:
            raise DistributedError(
                f"{problem}; or give --coordinator_address, --num_processes and --process_id, "
                "or --distributed=off to run a single process"
            )
        return False

    def validate(self) -> None:
        explicit = (self.coordinator_address, self.num_processes, self.process_id)
        if any(v is not None for v in explicit) and any(v is None for v in explicit):
            raise DistributedError(
                "give all three of --coordinator_address, --num_processes and --process_id (or "
                f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}), or none of them to "
                "let JAX detect a TPU/SLURM/MPI cluster"
            )
        if self.num_processes is not None and not 0 <= self.process_id < self.num_processes:
            raise DistributedError(
                f"--process_id={self.process_id} must be in [0, --num_processes="
                f"{self.num_processes})"
            )
        if self.num_cpu_devices < 0:
            raise DistributedError(f"--num_cpu_devices={self.num_cpu_devices} must be >= 0")

    def identity(self) -> tuple[str, str]:
        """(this process' index, the process count) as far as known before the runtime starts,
        for messages; '?' where only JAX's runtime will know."""
        if self.num_processes is not None:
            return str(self.process_id), str(self.num_processes)
        cluster = detect_cluster()
        if cluster is None:
            return "?", "?"
        try:
            return str(cluster.get_process_id()), str(cluster.get_process_count())
        except Exception:  # a detector that needs more than this process can see yet
            return "?", "?"

    def initialize(self) -> None:
        """Configure devices and join the job; call before any JAX computation."""
        self.validate()
        if self.num_cpu_devices:
            jax.config.update("jax_num_cpu_devices", self.num_cpu_devices)
        if not self.wants_distributed():
            return
        jax.distributed.initialize(
            coordinator_address=self.coordinator_address,
            num_processes=self.num_processes,
            process_id=self.process_id,
            local_device_ids=_bound_gpu(),
            initialization_timeout=self.initialization_timeout_s,
            heartbeat_timeout_seconds=self.heartbeat_timeout_s,
            shutdown_timeout_seconds=self.shutdown_timeout_s,
        )


def detect_cluster() -> type | None:
    """The cluster environment that ``jax.distributed.initialize()`` would configure itself from
    (JAX's own detectors, in JAX's order, opt-in ones skipped as JAX does), or None."""
    from jax._src import clusters  # JAX's registry of cluster environments (pinned jax version)

    return next(
        (
            env
            for env in clusters.ClusterEnv._cluster_types
            if not env.opt_in_only_method and env.is_env_present()
        ),
        None,
    )


def _unusable_launch() -> str | None:
    """What is wrong when the environment describes a multi-process launch JAX cannot configure."""
    env = os.environ
    tasks = env.get("SLURM_NTASKS", "")
    if env.get("SLURM_JOB_ID") and tasks.isdigit() and int(tasks) > 1:
        return (
            f"this process runs inside a SLURM allocation of {tasks} tasks but not in an srun "
            "step (SLURM_STEP_NODELIST or SLURM_PROCID is unset), so JAX cannot find the other "
            "processes: start the job with srun (launch/gpu_slurm.sbatch does)"
        )
    size = env.get("OMPI_COMM_WORLD_SIZE", "")
    if size.isdigit() and int(size) > 1:
        return (
            f"this is an Open MPI launch of {size} processes without OMPI_MCA_orte_hnp_uri "
            "(Open MPI 5 / PRRTE), which JAX's auto-detection does not read: pass the coordinator "
            "(rank 0's host:port) and $OMPI_COMM_WORLD_SIZE / $OMPI_COMM_WORLD_RANK explicitly"
        )
    return None


def _bound_gpu() -> list[int] | None:
    """[0] when SLURM bound one GPU to this task (``--gpus-per-task=1``: CUDA_VISIBLE_DEVICES names
    a single device, which the process sees as device 0), where JAX would ask for device
    SLURM_LOCALID and find nothing (jax-ml/jax#28194); None leaves JAX's choice."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if "JAX_LOCAL_DEVICE_IDS" in os.environ:  # the user's choice, which JAX reads itself
        return None
    if "SLURM_LOCALID" in os.environ and visible and "," not in visible:
        return [0]
    return None
