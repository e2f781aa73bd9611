"""Preemption across the stages of one multi-process job (runtime/preemption.py): a notice that
arrives between two stages of ``jobs.pipeline`` is acted on within one step of the next stage,
on every process at the same step; the reruns end exactly as an uninterrupted run.

Apart from tests/test_faults.py so that the two files, each minutes of end-to-end runs, can run
on the two test workers at once.
"""

import re
from pathlib import Path

import numpy as np
import pytest

from runtime import failpoints, preemption
from tests import fault_injection as fi

# End-to-end runs of the jobs: the full suite only (launch/test.sh --fast skips them).
pytestmark = pytest.mark.slow
FLAGS = fi.SCORE_FLAGS


def test_sigterm_between_stages_with_two_processes(tmp_path: Path) -> None:
    """The notice on both processes of a 2-process pipeline between training and Arnoldi, then
    (rerun) on process 1 alone between Arnoldi and scoring (jax.distributed tells process 0):
    both processes stop at the same step within one step of the next stage (the sync point
    follows the process' step counter over all stages, not each stage's own numbering, which
    restarts at 1 and would put the sync point past the next stage's end), save, exit 75, and
    the last rerun ends exactly as an uninterrupted run."""
    reference, workdir = tmp_path / "reference", tmp_path / "preempted"
    done = fi.run("pipeline", reference, 2, *FLAGS)
    assert done.code == 0, done.output[-3000:]

    def preempted_at(failpoint: str, message: str) -> int:
        run = fi.run("pipeline", workdir, 2, *FLAGS, env={failpoints.ENV: failpoint})
        assert run.code == preemption.EXIT_CODE, run.output[-3000:]
        at = {int(step) for step in re.findall(re.escape(message) + r"(\d+)", run.output)}
        assert len(at) == 1, run.output[-3000:]
        for process in (0, 1):  # each saved and said so
            assert re.search(rf"^\[{process}\] .*{re.escape(message)}", run.output, re.M)
        (step,) = at  # the same on both processes, within one step of the stage's start
        assert step <= 2, run.output[-6000:]
        return step

    # Training (8 steps) done, Arnoldi (12 iterations) stopped at its first or second.
    saved = preempted_at("stage=2:TERM", "Krylov state saved at iteration ")
    assert fi.steps(fi.results(workdir) / "krylov")[-1] == saved
    assert fi.steps(workdir / "params") and not fi.steps(fi.results(workdir) / "fitted")
    # Arnoldi finished, scoring (about 20 steps) stopped at its first or second.
    preempted_at("stage=3@1:TERM", "scoring preempted at step ")
    assert list((fi.results(workdir) / "scores").rglob("_partial*"))
    final = fi.run("pipeline", workdir, 2, *FLAGS)
    assert final.code == 0, final.output[-3000:]
    np.testing.assert_array_equal(fi.eigvals(workdir), fi.eigvals(reference))
    fi.assert_same_scores(workdir, reference)
