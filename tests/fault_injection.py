"""Fault injection for the jobs: kill chains, checkpoint damage, output comparison.

Shared by tests/test_faults.py (a CI-sized suite) and tests/fault_sweep.py (a larger seeded sweep
run by hand). A *kill chain* runs a job again and again on one workdir, each run SIGKILLed at the
next of a list of points (``runtime/failpoints.py``), then once more to completion: every run
must resume from what the killed ones left behind.
"""

import dataclasses
from pathlib import Path

import jax
import numpy as np

from launch import multiprocess
from runtime import failpoints
from stages import artifacts, checks, setup
from tests.pipeline_helpers import (
    REPO,
    eigvals,
    job_command,
    job_env,
    launch_job,
    results,
    run_job,
    scores,
    steps,
    tiny_config,
)

# Re-exported: the fault tests reach every helper through this module.
__all__ = ["REPO", "eigvals", "job_command", "job_env", "results", "scores", "steps"]

# Scoring in many small steps (parts of 32 rows, global batches of 16): kill points land inside
# parts, between parts and in the padding steps of the process with fewer parts.
SCORE_FLAGS = ("--config.score.batch_size=16", "--config.score.examples_per_shard=32")
FAILPOINT = {"arnoldi": "arnoldi_iteration", "score": "score_batch", "train": "train_step"}


@dataclasses.dataclass
class Run:
    code: int
    output: str
    outcome: multiprocess.Outcome | None = None  # how each process ended (several processes)


def run(job: str, workdir: Path, processes: int = 1, *flags: str, env: dict | None = None) -> Run:
    """One job run: in a subprocess (1 process, 1 device unless --num_cpu_devices is given) or as
    ``processes`` local processes of 1 device each."""
    if processes == 1:
        done = run_job(job, workdir, *flags, env=env)
        return Run(done.returncode, done.stdout + done.stderr)
    outcome, output = launch_job(job, workdir, processes, 1, *flags, env=env)
    return Run(outcome.exit_code, output, outcome)


def kill_chain(
    job: str,
    workdir: Path,
    points: list[tuple[int, int]],
    processes: int = 1,
    *flags: str,
) -> list[Run]:
    """Run ``job`` once per (step, process) in ``points``, SIGKILLing that process at that step,
    then once without faults. Returns every run; a run that finished before its point was reached
    ends the chain early (its point was not exercised)."""
    runs = []
    for step, process in points:
        spec = f"{FAILPOINT[job]}={step}" + (f"@{process}" if processes > 1 else "")
        result = run(job, workdir, processes, *flags, env={failpoints.ENV: spec})
        runs.append(result)
        if result.code == 0:
            return runs
        assert killed(result, process), result.output[-3000:]
    final = run(job, workdir, processes, *flags)
    assert final.code == 0, final.output[-3000:]
    return [*runs, final]


def killed(result: Run, process: int = 0) -> bool:
    """Whether a run ended by the injected SIGKILL of ``process`` and nothing else: that process
    died of SIGKILL and every other one stopped on its own with the project's line and exit 1
    (not a crash of its own, not killed by the launcher after hanging)."""
    if result.outcome is None:
        return result.code == -9
    survivors = [i for i in range(len(result.outcome.codes)) if i != process]
    return result.outcome.codes[process] == -9 and all(
        result.outcome.codes[i] == 1
        and f"[{i}] error: process {i} of {len(result.outcome.codes)}: " in result.output
        for i in survivors
    )


def kills(runs: list[Run]) -> int:
    return sum(1 for r in runs if r.code != 0)


def assert_same_scores(got: Path, want: Path, rtol: float = 0.0) -> None:
    """Same examples, each once, with the same values (bitwise when ``rtol`` is 0)."""
    for split in ("train", "eval"):
        a, b = scores(got, split), scores(want, split)
        assert len(a) == len(b)
        np.testing.assert_array_equal(a["id"], b["id"])
        for column in ("self_influence", "projections"):
            x, y = np.stack(a[column].to_numpy()), np.stack(b[column].to_numpy())
            if rtol:
                np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * np.abs(y).max())
            else:
                np.testing.assert_array_equal(x, y)


def params(workdir: Path) -> list[np.ndarray]:
    """The trained params of a workdir (runlocal config) as numpy leaves."""
    ctx = setup.context(tiny_config(), workdir, checks.check_train)
    restored, _ = artifacts.restore_params(ctx)
    return [np.asarray(x) for x in jax.tree.leaves(restored)]


def damage(step_dir: Path, how: str) -> None:
    """Damage a saved step the way disks and interrupted copies do."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file())
    assert files, step_dir
    if how == "truncate":  # every array file cut to half
        for p in files:
            if "ocdbt" in str(p) or p.parent.name == "d":
                p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif how == "garbage":  # every file overwritten with noise of the same size
        rng = np.random.default_rng(0)
        for p in files:
            p.write_bytes(rng.integers(0, 256, p.stat().st_size, dtype=np.uint8).tobytes())
    elif how == "empty":  # a copy that stopped before any file arrived
        for p in files:
            p.unlink()
    else:
        raise ValueError(how)
