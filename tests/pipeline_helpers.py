"""Shared set-up for tests that run the jobs: a tiny config and a subprocess runner."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pandas as pd

from configs import mnist
from launch import multiprocess
from tests import xla_flags

REPO = Path(__file__).resolve().parents[1]


# Scoring mode of every test run: score.mode=auto chooses by timing, so two runs may score in
# different modes, which agree to rtol 1e-4 but not bit for bit, and the fault and multi-process
# tests compare runs exactly. Auto itself is tested where it is the subject (test_projection.py).
FIXED_MODE = "forward"


def tiny_config(**overrides: object) -> ml_collections.ConfigDict:
    """The ``runlocal`` preset on one device: 256 train examples, n=12, p̃=8."""
    config = mnist.get_config("runlocal")
    config.mesh.num_devices = 1
    config.score.mode = FIXED_MODE
    config.log_every_secs = 1000.0
    return override(config, **overrides)


def override(config: ml_collections.ConfigDict, **fields: object) -> ml_collections.ConfigDict:
    """``config`` with its fields set from keyword arguments that name them with '__' for '.'
    (``arnoldi__num_iters=12``)."""
    for dotted, value in fields.items():
        node = config
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def job_command(
    job: str, workdir: Path, *flags: str, config: str = "configs/mnist.py:runlocal"
) -> list[str]:
    """``python -m jobs.<job>`` on ``config`` (default: the runlocal preset)."""
    return [
        sys.executable,
        "-m",
        f"jobs.{job}",
        f"--config={config}",
        f"--workdir={workdir}",
        "--config.log_every_secs=1000",
        f"--config.score.mode={FIXED_MODE}",
        *flags,
    ]


# Variables by which a job would join a cluster (a CI runner inside SLURM, say): never inherited.
CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "INFLUENCE_", "JAX_COORDINATOR")


def job_env(extra: dict | None = None) -> dict[str, str]:
    """The test process' environment for a job on the CPU, with no cluster variables: 1 process of
    1 device unless ``extra`` asks for more."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_PREFIXES)}
    env.update({"JAX_PLATFORMS": "cpu", **(extra or {})})
    env["XLA_FLAGS"] = xla_flags.THREADS
    return env


def run_module(*args: str) -> str:
    """``python -m <args>`` from the repository root (1 CPU device); its stdout, after checking
    it exited 0."""
    done = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def run_job(
    job: str,
    workdir: Path,
    *flags: str,
    env: dict | None = None,
    config: str = "configs/mnist.py:runlocal",
) -> subprocess.CompletedProcess:
    """``jobs.<job>`` on ``config`` in a fresh process (1 CPU device unless flags ask)."""
    return subprocess.run(
        job_command(job, workdir, *flags, config=config),
        cwd=REPO,
        env=job_env(env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def launch_job(
    job: str,
    workdir: Path,
    num_processes: int,
    devices_per_process: int,
    *flags: str,
    env: dict | None = None,
) -> tuple[multiprocess.Outcome, str]:
    """``jobs.<job>`` on the runlocal config as ``num_processes`` local processes joined by
    jax.distributed (launch/multiprocess.py); returns how each ended and the prefixed output."""
    sink = io.StringIO()
    outcome = multiprocess.launch(
        job_command(job, workdir, *flags),
        num_processes,
        devices_per_process,
        grace_secs=120,
        sink=sink,
        env={"XLA_FLAGS": xla_flags.THREADS, **(env or {})},
        cwd=REPO,
        timeout_secs=600,
    )
    return outcome, sink.getvalue()


def run_multiprocess(
    job: str,
    workdir: Path,
    num_processes: int,
    devices_per_process: int,
    *flags: str,
    env: dict | None = None,
) -> tuple[int, str]:
    """``launch_job`` reduced to (the job's exit code, the output)."""
    outcome, output = launch_job(job, workdir, num_processes, devices_per_process, *flags, env=env)
    return outcome.exit_code, output


def copy_trained(trained: Path, workdir: Path) -> Path:
    """``workdir`` holding the trained params of ``trained`` (a workdir the train stage finished:
    its params, the params kept per epoch and the corrupted-example record)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("params", "epoch_params"):
        if (trained / name).exists():
            shutil.copytree(trained / name, workdir / name)
    shutil.copy(trained / "corrupted.parquet", workdir / "corrupted.parquet")
    return workdir


def results(workdir: Path, method: str = "arnoldi") -> Path:
    """A method's results in a workdir (runtime/workdir.py: ``methods/<name>/``)."""
    return Path(workdir) / "methods" / method


def fit_summary(workdir: Path, method: str = "arnoldi") -> dict:
    """A method's fit.json."""
    return json.loads((results(workdir, method) / "fit.json").read_text())


def eigvals(workdir: Path, method: str = "arnoldi") -> np.ndarray:
    return np.asarray(fit_summary(workdir, method)["eigvals"])


def steps(directory: Path) -> list[int]:
    """Complete Orbax steps in a checkpoint directory."""
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def scores(workdir: Path, split: str) -> pd.DataFrame:
    """A split's scores sorted by id, after checking each example appears exactly once."""
    table = pd.read_parquet(results(workdir) / "scores" / split)
    assert table["id"].is_unique, f"duplicate ids in {split}"
    return table.sort_values("id").reset_index(drop=True)
