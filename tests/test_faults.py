"""Fault injection: jobs killed, preempted, moved to other meshes, fed damaged checkpoints.

Every check compares against an uninterrupted run of the same job: a resumed Arnoldi must end with
the same eigenvalues (bitwise on the same mesh, rtol 1e-5 on another), a resumed scoring run with
every example exactly once and the same values. Sized for CI (tiny config, 8 seeded SIGKILL
points); ``python -m tests.fault_sweep`` runs a larger seeded sweep.
"""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from checkpoints.checkpointer import CheckpointError
from runtime import failpoints, preemption
from stages import fit, score, train
from tests import fault_injection as fi
from tests.pipeline_helpers import copy_trained, run_multiprocess, tiny_config

# A damaged step that Orbax fails to restore leaves an asyncio callback behind, which fires after
# its event loop closed ("Event loop is closed"): harmless, and not what these tests check. The
# tests run the jobs end to end: the full suite only (launch/test.sh --fast skips them).
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.slow,
]
SEED = 20261124
# The jobs' config in every subprocess run (runlocal + the scoring flags) and in-process.
FLAGS = fi.SCORE_FLAGS
CONFIG = {"score__batch_size": 16, "score__examples_per_shard": 32}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, runlocal_trained: Path) -> Path:
    workdir = copy_trained(runlocal_trained, tmp_path_factory.mktemp("trained"))
    train.run(tiny_config(**CONFIG), workdir)  # finds them
    return workdir


def with_params(trained: Path, workdir: Path, *stages: str) -> Path:
    """A workdir holding the trained params (and the named finished results of Arnoldi in
    ``trained``: ``krylov``, ``fitted``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(trained / "params", workdir / "params")
    for name in stages:
        shutil.copytree(fi.results(trained) / name, fi.results(workdir) / name)
    if "fitted" in stages:
        shutil.copy(fi.results(trained) / "fit.json", fi.results(workdir) / "fit.json")
    return workdir


@pytest.fixture(scope="module", params=[1, 2], ids=["1-process", "2-processes"])
def reference(request, trained: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """(workdir, processes): uninterrupted fit (Arnoldi) + score with 1 process, or 2 of 1
    device: one launch of the pipeline job, whose train stage finds the params."""
    workdir = with_params(trained, tmp_path_factory.mktemp(f"reference{request.param}"))
    result = fi.run("pipeline", workdir, request.param, *FLAGS)
    assert result.code == 0, result.output[-3000:]
    return workdir, request.param


@pytest.mark.parametrize("job", ["arnoldi", "score"])
def test_sigkill_at_seeded_random_points(
    reference: tuple[Path, int], tmp_path: Path, job: str
) -> None:
    """8 SIGKILLs in all (3 per chain with 1 process, 1 with 2, the killed process drawn at
    random): every chain resumes from what the killed runs left and ends exactly where the
    uninterrupted run ended (``python -m tests.fault_sweep`` runs a larger sweep)."""
    reference, processes = reference
    rng = np.random.default_rng([SEED, processes, len(job)])
    count = 3 if processes == 1 else 1
    if job == "arnoldi":  # iterations 1..12, increasing: each run gets past the previous point
        steps = np.sort(rng.choice(np.arange(1, 13), count, replace=False))
        workdir = with_params(reference, tmp_path / "w")
    else:  # steps of the current run; at most one finished part per kill, so all fire
        steps = rng.integers(1, 4 if processes == 1 else 7, count)
        workdir = with_params(reference, tmp_path / "w", "krylov", "fitted")
    points = [(int(s), int(rng.integers(processes))) for s in steps]
    runs = fi.kill_chain(job, workdir, points, processes, *FLAGS)
    print(f"\n{job}, {processes} process(es): killed at {points}")
    assert fi.kills(runs) == count, "a run finished before its kill point"
    if job == "arnoldi":
        assert sum("resuming Arnoldi at iteration" in r.output for r in runs) >= 1
        np.testing.assert_array_equal(fi.eigvals(workdir), fi.eigvals(reference))
    else:
        fi.assert_same_scores(workdir, reference)


def test_sigkill_during_async_save(trained: Path, tmp_path: Path) -> None:
    """Killed right after the save of iteration 8 started (its files still being written):
    the next run resumes from a complete step and ends with the uninterrupted eigenvalues."""
    reference = with_params(trained, tmp_path / "reference")
    assert fi.run("arnoldi", reference, 1, *FLAGS).code == 0
    workdir = with_params(trained, tmp_path / "killed")
    killed = fi.run("arnoldi", workdir, 1, *FLAGS, env={failpoints.ENV: "arnoldi_saved=8"})
    assert killed.code == -9
    krylov = fi.results(workdir) / "krylov"
    in_flight = [p.name for p in krylov.iterdir() if "tmp" in p.name]
    print(f"\nleft behind: steps {fi.steps(krylov)}, in-flight {in_flight}")
    assert max(fi.steps(krylov)) <= 8
    resumed = fi.run("arnoldi", workdir, 1, *FLAGS)
    assert resumed.code == 0, resumed.output[-3000:]
    np.testing.assert_array_equal(fi.eigvals(workdir), fi.eigvals(reference))


@pytest.mark.parametrize("job", ["train", "arnoldi", "score"])
def test_sigterm_saves_the_step_reached_and_exits_75(
    finished: Path, tmp_path: Path, job: str
) -> None:
    """SIGTERM at step 3 of one process: exit code 75 (preempted, saved) with a checkpoint of
    step 3; the next run continues from there and ends with the uninterrupted result."""
    stages = ("krylov", "fitted") if job == "score" else ()
    reference, workdir = (
        tmp_path / name if job == "train" else with_params(finished, tmp_path / name, *stages)
        for name in ("reference", "preempted")
    )
    assert fi.run(job, reference, 1, *FLAGS).code == 0
    env = {failpoints.ENV: f"{fi.FAILPOINT[job]}=3:TERM"}
    preempted = fi.run(job, workdir, 1, *FLAGS, env=env)
    assert preempted.code == preemption.EXIT_CODE == 75, preempted.output[-3000:]
    assert "preempted" in preempted.output
    if job == "train":
        assert fi.steps(workdir / "train_state")[-1] == 3 and not fi.steps(workdir / "params")
    elif job == "arnoldi":
        assert fi.steps(fi.results(workdir) / "krylov")[-1] == 3
    else:  # part 0 done at step 2; 16 rows of part 1 kept, hidden from readers of the directory
        train_scores = fi.results(workdir) / "scores/train"
        assert (train_scores / "part-00000-of-00008.parquet").exists()
        assert (train_scores / "_partial.part-00001-of-00008.parquet").exists()
    resumed = fi.run(job, workdir, 1, *FLAGS)
    assert resumed.code == 0, resumed.output[-3000:]
    marker = {
        "train": "resuming training at step 3",
        "arnoldi": "resuming Arnoldi at iteration 3",
        "score": "(1 resumed)",
    }[job]
    assert marker in resumed.output
    if job == "train":
        assert (workdir / "corrupted.parquet").exists()
        for got, want in zip(fi.params(workdir), fi.params(reference), strict=True):
            np.testing.assert_array_equal(got, want)
    elif job == "arnoldi":  # the preemption's piece (rows 0..3), then pieces of rows 4, 5..8, ...
        assert fi.steps(fi.results(workdir) / "krylov") == [3, 4, 8, 12]
        np.testing.assert_array_equal(fi.eigvals(workdir), fi.eigvals(reference))
    else:
        fi.assert_same_scores(workdir, reference)
        assert not list((fi.results(workdir) / "scores").rglob("_partial*"))


def test_resume_on_other_topologies(trained: Path, tmp_path: Path) -> None:
    """A Krylov state saved by 2 processes x 2 devices resumes on 1 process x 4 devices and on
    1 x 1, and scoring killed in 2 processes finishes in 1: same results (rtol 1e-5)."""
    reference = with_params(trained, tmp_path / "reference")
    for job in ("arnoldi", "score"):
        assert fi.run(job, reference, 1, *FLAGS).code == 0
    saved = with_params(trained, tmp_path / "saved")
    code, output = run_multiprocess(
        "arnoldi", saved, 2, 2, *FLAGS, env={failpoints.ENV: "arnoldi_iteration=10@0"}
    )
    # 8, or 4 if the save of 8 was still in flight
    last = fi.steps(fi.results(saved) / "krylov")[-1]
    assert code != 0 and last in (4, 8), output[-3000:]
    for name, devices in (("one-by-four", 4), ("one-by-one", 1)):
        workdir = tmp_path / name
        shutil.copytree(saved, workdir)
        result = fi.run("arnoldi", workdir, 1, *FLAGS, f"--num_cpu_devices={devices}")
        assert result.code == 0 and f"resuming Arnoldi at iteration {last}" in result.output
        np.testing.assert_allclose(fi.eigvals(workdir), fi.eigvals(reference), rtol=1e-5)
    workdir = tmp_path / "one-by-one"
    killed = fi.run("score", workdir, 2, *FLAGS, env={failpoints.ENV: "score_batch=9@1"})
    assert killed.code != 0 and list((fi.results(workdir) / "scores/train").glob("part-*.parquet"))
    finished = fi.run("score", workdir, 1, *FLAGS)
    assert finished.code == 0, finished.output[-3000:]
    fi.assert_same_scores(workdir, reference, rtol=1e-5)


@pytest.fixture(scope="module")
def finished(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Arnoldi run to the end in this process: Krylov pieces 4, 8 and 12, eigenpairs."""
    workdir = with_params(trained, tmp_path_factory.mktemp("finished"))
    fit.run(tiny_config(**CONFIG), workdir)
    assert fi.steps(fi.results(workdir) / "krylov") == [4, 8, 12]
    return workdir


def without_eigenpairs(finished: Path, workdir: Path) -> Path:
    """The workdir of a run killed after its last Krylov save: pieces 4, 8, 12, no eigenpairs."""
    shutil.copytree(finished, workdir)
    shutil.rmtree(fi.results(workdir) / "fitted")
    (fi.results(workdir) / "fit.json").unlink()
    return workdir


@pytest.mark.parametrize(
    ("how", "damaged"), [("truncate", 12), ("garbage", 12), ("empty", 12), ("truncate", 8)]
)
def test_unreadable_piece_falls_back(
    finished: Path, tmp_path: Path, how: str, damaged: int
) -> None:
    """A damaged Krylov piece: it and the pieces after it (which build on it) are moved aside
    with a warning, the run resumes from the piece before and ends with the same eigenvalues."""
    workdir = without_eigenpairs(finished, tmp_path / "w")
    krylov = fi.results(workdir) / "krylov"
    fi.damage(krylov / str(damaged), how)
    fit.run(tiny_config(**CONFIG), workdir)
    moved = sorted(int(p.name.split(".")[0]) for p in krylov.glob("*.unreadable-*"))
    assert moved == list(range(damaged, 13, 4))
    assert fi.steps(krylov) == [4, 8, 12]
    np.testing.assert_array_equal(fi.eigvals(workdir), fi.eigvals(finished))


def test_no_readable_step_is_an_error_and_changes_nothing(finished: Path, tmp_path: Path) -> None:
    """The first Krylov piece damaged (every later one builds on it): a clear error naming the
    directory, never a silent restart from zero, and the directory is left exactly as it was."""
    workdir = without_eigenpairs(finished, tmp_path / "w")
    krylov = fi.results(workdir) / "krylov"
    fi.damage(krylov / "4", "truncate")
    before = sorted(str(p) for p in krylov.rglob("*"))
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*krylov"):
        fit.run(tiny_config(**CONFIG), workdir)
    assert sorted(str(p) for p in krylov.rglob("*")) == before


def test_unreadable_eigenpairs_are_distilled_again(finished: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    fi.damage(fi.results(workdir) / "fitted" / "0", "truncate")
    with pytest.raises(
        CheckpointError, match=r"`python -m jobs\.fit` with the same --config and --workdir fits"
    ):
        score.run(tiny_config(**CONFIG), workdir)
    fit.run(tiny_config(**CONFIG), workdir)
    assert list((fi.results(workdir) / "fitted").glob("0.unreadable-*"))
    score.run(tiny_config(**CONFIG), workdir)
    np.testing.assert_array_equal(fi.eigvals(workdir), fi.eigvals(finished))


def mount_tmpfs(mountpoint: Path, size: str) -> str | None:
    """Mount a tmpfs (a real, small, separate filesystem); the reason when this machine won't."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    return None if done.returncode == 0 else (done.stderr.strip() or "mount failed")


def test_read_only_workdir(trained: Path, tmp_path: Path) -> None:
    """A workdir the job cannot write to: one line naming it, before any work, nothing changed.
    Read-only for real: a filesystem remounted read-only (root may write anywhere else), or,
    without mount rights, a directory without write permission."""
    workdir = tmp_path / "ro"
    command = fi.job_command("arnoldi", workdir, *FLAGS)
    mounted = mount_tmpfs(workdir, "16m") is None
    try:
        with_params(trained, workdir)
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(workdir)], check=True)
        elif os.geteuid() == 0:
            pytest.skip("running as root without mount rights: cannot make a directory read-only")
        else:
            for path in [workdir, *workdir.rglob("*")]:
                path.chmod(0o555 if path.is_dir() else 0o444)
        before = sorted(str(p) for p in workdir.rglob("*"))
        result = subprocess.run(
            command, cwd=fi.REPO, env=fi.job_env(), capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 2, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: --workdir=") and "is not writable" in last
        assert sorted(str(p) for p in workdir.rglob("*")) == before
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(workdir)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs: a disk that can really fill up (needs mount rights, as root in CI)."""
    mount = tmp_path / "disk"
    if (reason := mount_tmpfs(mount, "4m")) is not None:
        pytest.skip(f"cannot mount a tmpfs to fill up: {reason}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk(trained: Path, finished: Path, small_disk: Path) -> None:
    """The disk fills up during a Krylov save: one line saying so, exit 1, the complete steps
    intact; with space freed, the same command resumes and ends with the same eigenvalues."""
    workdir = with_params(trained, small_disk / "w")
    free_kib = shutil.disk_usage(small_disk).free // 1024
    filler = small_disk / "filler"
    subprocess.run(["fallocate", "-l", f"{(free_kib - 200) * 1024}", str(filler)], check=True)
    full = fi.run("arnoldi", workdir, 1, *FLAGS)
    assert full.code == 1, full.output[-3000:]
    last = full.output.strip().splitlines()[-1]
    assert last.startswith("error: writing to --workdir=") and "the disk is full" in last
    saved = fi.steps(fi.results(workdir) / "krylov")
    assert saved and saved[-1] < 12
    filler.unlink()
    resumed = fi.run("arnoldi", workdir, 1, *FLAGS)
    assert resumed.code == 0 and f"resuming Arnoldi at iteration {saved[-1]}" in resumed.output
    np.testing.assert_array_equal(fi.eigvals(workdir), fi.eigvals(finished))


def test_compatible_changes_on_resume(finished: Path, tmp_path: Path) -> None:
    """Scoring preempted with batch 16 on 1 device continues with batch 32 on 2 devices (a
    compatible change: batch size and mesh are not part of the scores' fingerprint)."""
    reference = with_params(finished, tmp_path / "reference", "krylov", "fitted")
    assert fi.run("score", reference, 1, *FLAGS).code == 0
    workdir = with_params(finished, tmp_path / "w", "krylov", "fitted")
    env = {failpoints.ENV: "score_batch=3:TERM"}
    assert fi.run("score", workdir, 1, *FLAGS, env=env).code == preemption.EXIT_CODE
    resumed = fi.run(
        "score",
        workdir,
        1,
        *FLAGS,
        "--config.score.batch_size=32",
        "--num_cpu_devices=2",
        "--config.log_every_secs=0.5",
    )
    assert resumed.code == 0 and "(1 resumed)" in resumed.output, resumed.output[-3000:]
    fi.assert_same_scores(workdir, reference, rtol=1e-5)


def test_sigkill_with_the_basis_in_host_memory_resumes_on_disk(
    trained: Path, finished: Path, tmp_path: Path
) -> None:
    """arnoldi.basis_storage=host killed as the save of iteration 8 starts (SIGKILL: the basis in
    host memory is lost, the piece of iteration 4 is not) resumes with basis_storage=disk from its
    last complete piece and ends with the eigenvalues of an uninterrupted disk run bit for bit (both stream the same
    blocks through the same programs), and within 1e-6 of the device basis'; the disk's scratch
    copy of the basis is gone once the fit ends."""
    streamed = ("--config.arnoldi.orthogonalization=bcgs2", "--config.arnoldi.block_rows=5")
    host, disk = (f"--config.arnoldi.basis_storage={where}" for where in ("host", "disk"))
    reference = with_params(trained, tmp_path / "reference")
    assert fi.run("arnoldi", reference, 1, *FLAGS, *streamed, disk).code == 0
    workdir = with_params(trained, tmp_path / "killed")
    env = {failpoints.ENV: "arnoldi_saved=8"}
    assert fi.run("arnoldi", workdir, 1, *FLAGS, *streamed, host, env=env).code == -9
    saved = fi.steps(fi.results(workdir) / "krylov")
    assert saved[0] == 4 and saved[-1] <= 8
    resumed = fi.run("arnoldi", workdir, 1, *FLAGS, *streamed, disk)
    assert resumed.code == 0, resumed.output[-3000:]
    assert f"resuming Arnoldi at iteration {saved[-1]}" in resumed.output
    assert "MiB on disk (basis_storage=disk" in resumed.output
    np.testing.assert_array_equal(fi.eigvals(workdir), fi.eigvals(reference))
    np.testing.assert_allclose(fi.eigvals(workdir), fi.eigvals(finished), rtol=1e-6)
    assert not list((fi.results(workdir) / "krylov_basis").glob("process_*"))
