"""Shared set-up for tests that run the jobs: a tiny config and a subprocess runner."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pandas as pd

from configs import mnist
from launch import multiprocess

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**overrides: object) -> ml_collections.ConfigDict:
    """The ``runlocal`` preset on one device: 256 train examples, n=12, p̃=8."""
    config = mnist.get_config("runlocal")
    config.mesh.num_devices = 1
    config.log_every_secs = 1000.0
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def job_command(job: str, workdir: Path, *flags: str) -> list[str]:
    """``python -m jobs.<job>`` on the runlocal config."""
    return [
        sys.executable,
        "-m",
        f"jobs.{job}",
        "--config=configs/mnist.py:runlocal",
        f"--workdir={workdir}",
        "--config.log_every_secs=1000",
        *flags,
    ]


def job_env(extra: dict | None = None) -> dict[str, str]:
    """The test process' environment for a job on the CPU: 1 device unless the job asks."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(extra or {})}
    env.pop("XLA_FLAGS", None)
    return env


def run_job(
    job: str, workdir: Path, *flags: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``jobs.<job>`` on the runlocal config in a fresh process (1 CPU device)."""
    return subprocess.run(
        job_command(job, workdir, *flags),
        cwd=REPO,
        env=job_env(env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def run_multiprocess(
    job: str,
    workdir: Path,
    num_processes: int,
    devices_per_process: int,
    *flags: str,
    env: dict | None = None,
) -> tuple[int, str]:
    """``jobs.<job>`` on the runlocal config as ``num_processes`` local processes joined by
    jax.distributed (launch/multiprocess.py); returns (exit code, prefixed output of all)."""
    sink = io.StringIO()
    code = multiprocess.launch(
        job_command(job, workdir, *flags),
        num_processes,
        devices_per_process,
        grace_secs=120,
        sink=sink,
        env=env,
        cwd=REPO,
        timeout_secs=600,
    )
    return code, sink.getvalue()


def eigvals(workdir: Path) -> np.ndarray:
    return np.asarray(json.loads((workdir / "eigenvalues.json").read_text())["eigvals"])


def steps(directory: Path) -> list[int]:
    """Complete Orbax steps in a checkpoint directory."""
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def scores(workdir: Path, split: str) -> pd.DataFrame:
    """A split's scores sorted by id, after checking each example appears exactly once."""
    table = pd.read_parquet(workdir / "scores" / split)
    assert table["id"].is_unique, f"duplicate ids in {split}"
    return table.sort_values("id").reset_index(drop=True)
