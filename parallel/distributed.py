"""The multi-controller runtime: one process per host (or GPU), all running the same program.

``jax.distributed.initialize`` must run before anything touches a device. Three ways to start:

- Cloud TPU pods, SLURM and Open MPI: JAX detects the cluster from its environment
  (``--distributed=on`` with no address).
- Anything else (a GPU cluster without SLURM, several processes on one machine): an explicit
  coordinator address, process count and process id, from flags or the environment variables
  below (flags win).
- One process: nothing to initialise (``--distributed=auto``, the default, starts the runtime only
  when a coordinator address or a multi-process cluster environment is present).

The heartbeat timeout bounds how long the survivors of a dead process wait before they fail: each
process pings the coordination service, and a process silent for longer is declared dead, which
makes every other process stop with an error instead of waiting forever in a collective.
"""

import dataclasses
import os

import jax

ENV_COORDINATOR = "INFLUENCE_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "INFLUENCE_NUM_PROCESSES"
ENV_PROCESS_ID = "INFLUENCE_PROCESS_ID"
ENV_NUM_CPU_DEVICES = "INFLUENCE_NUM_CPU_DEVICES"
MODES = ("auto", "on", "off")


class DistributedError(ValueError):
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
        if self.mode not in MODES:
            raise DistributedError(f"--distributed={self.mode!r}; choose one of {MODES}")
        if self.mode != "auto":
            return self.mode == "on"
        return self.coordinator_address is not None or _cluster_environment()

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
            initialization_timeout=self.initialization_timeout_s,
            heartbeat_timeout_seconds=self.heartbeat_timeout_s,
            shutdown_timeout_seconds=self.shutdown_timeout_s,
        )


def _cluster_environment() -> bool:
    """A multi-process launch that JAX can configure itself: a TPU pod slice, SLURM or Open MPI
    with more than one task."""
    env = os.environ
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(var, "1").isdigit() and int(env.get(var, "1")) > 1:
            return True
    return False
