r"""A larger seeded SIGKILL sweep than CI runs (tests/test_faults.py runs 20 points).

    .venv/bin/python -m tests.fault_sweep --points=100 --seed=1 --processes=1,2

Trains the runlocal MNIST model once, computes uninterrupted arnoldi + score references for each
process count, then runs kill chains of random length at random points (the killed process drawn
at random too) until ``--points`` kills have been injected, checking after every chain that the
result is identical to the reference. Prints one line per chain and a summary; exits 1 on the
first mismatch.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from absl import app, flags

from stages import train
from tests import fault_injection as fi
from tests.pipeline_helpers import tiny_config

_POINTS = flags.DEFINE_integer("points", 100, "SIGKILLs to inject in all.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the kill points.")
_PROCESSES = flags.DEFINE_list("processes", ["1", "2"], "Process counts to sweep.")
_CHAIN = flags.DEFINE_integer("max_chain", 6, "Most kills in one chain.")


def main(argv: list[str]) -> None:
    del argv
    rng = np.random.default_rng(_SEED.value)
    config = {"score__batch_size": 16, "score__examples_per_shard": 32}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train.run(tiny_config(**config), root / "trained")
        references = {}
        for processes in map(int, _PROCESSES.value):
            ref = root / f"reference{processes}"
            shutil.copytree(root / "trained" / "params", ref / "params")
            for job in ("arnoldi", "score"):
                result = fi.run(job, ref, processes, *fi.SCORE_FLAGS)
                if result.code:
                    sys.exit(f"reference {job} with {processes} processes failed:\n{result.output}")
            references[processes] = ref
        injected, chain = 0, 0
        while injected < _POINTS.value:
            chain += 1
            processes = int(rng.choice(list(references)))
            job = str(rng.choice(["arnoldi", "score"]))
            count = int(rng.integers(1, _CHAIN.value + 1))
            ref, workdir = references[processes], root / f"chain{chain}"
            shutil.copytree(ref / "params", workdir / "params")
            if job == "arnoldi":
                steps = np.sort(rng.choice(np.arange(1, 13), min(count, 12), replace=False))
            else:
                for name in ("krylov", "fitted"):
                    shutil.copytree(fi.results(ref) / name, fi.results(workdir) / name)
                steps = rng.integers(1, 4 if processes == 1 else 7, count)
            points = [(int(s), int(rng.integers(processes))) for s in steps]
            runs = fi.kill_chain(job, workdir, points, processes, *fi.SCORE_FLAGS)
            injected += fi.kills(runs)
            try:
                if job == "arnoldi":
                    np.testing.assert_array_equal(fi.eigvals(workdir), fi.eigvals(ref))
                else:
                    fi.assert_same_scores(workdir, ref)
            except AssertionError as e:
                print(f"chain {chain}: {job}, {processes} processes, kills {points}: MISMATCH\n{e}")
                sys.exit(1)
            print(f"chain {chain}: {job}, {processes} processes, kills {points}: identical")
            shutil.rmtree(workdir)
        print(f"{injected} SIGKILLs in {chain} chains; every resumed run matched its reference")


if __name__ == "__main__":
    app.run(main)
