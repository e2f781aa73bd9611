"""The commands of the README and of the docs run as written.

Every fenced ``bash`` block of README.md, then of every page under docs/ (in sorted path order),
is run, command by command, in one scratch directory that stands for the repository root
(``configs/`` and ``examples/`` linked in, the package importable, ``python`` and
``.venv/bin/python`` the test's interpreter), in that order, so later blocks see the workdirs
earlier ones made. Skipped, by their first line: blocks that need a pod, a cluster or data from
outside (``# needs ...``; tests/test_launchers.py runs those scripts against stubs) and long
experiments (``# long: ...``; their results are in the docs with their commands), and the
quick-start block (its second command is this test suite; a fresh clone runs both). What runs is
meant to stay cheap: the runlocal smoke runs, the bring-your-own-model example, a multi-process
smoke run and short overrides of them.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline_helpers import REPO, job_env

# End-to-end runs of the jobs: the full suite only (launch/test.sh --fast skips them).
pytestmark = pytest.mark.slow

FENCE = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)


def doc_files() -> list[Path]:
    """README.md, then every Markdown page under docs/ in sorted path order."""
    docs = sorted((REPO / "docs").rglob("*.md"), key=lambda p: p.relative_to(REPO).as_posix())
    return [REPO / "README.md", *docs]


def doc_blocks() -> list[tuple[str, str, list[str]]]:
    """(file, first line, commands) of each bash block: continuation lines joined, comments
    dropped."""
    blocks = []
    for path in doc_files():
        for body in FENCE.findall(path.read_text()):
            joined = re.sub(r"\\\n\s*", " ", body)
            commands = [re.split(r"\s{2,}#", line)[0].strip() for line in joined.splitlines()]
            commands = [c for c in commands if c and not c.startswith("#")]
            blocks.append((path.relative_to(REPO).as_posix(), body.splitlines()[0], commands))
    return blocks


def runnable(first_line: str, commands: list[str]) -> bool:
    skipped = first_line.startswith(("# needs", "# long"))
    return not skipped and not any("launch/test.sh" in c for c in commands)


def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    blocks = doc_blocks()
    to_run = [(name, commands) for name, first, commands in blocks if runnable(first, commands)]
    assert len(blocks) >= 8 and len(to_run) >= 3, "the README and docs lost their commands?"
    for folder in ("configs", "examples"):
        (tmp_path / folder).symlink_to(REPO / folder)
    for wrapper in (tmp_path / "bin" / "python", tmp_path / ".venv" / "bin" / "python"):
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
        wrapper.chmod(0o755)
    env = job_env(
        {
            "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
            "PYTHONPATH": str(REPO),
        }
    )
    ran = []
    for name, commands in to_run:
        for command in commands:
            done = subprocess.run(
                ["bash", "-c", command],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert done.returncode == 0, f"{name}: {command}\n{done.stderr[-3000:]}"
            ran.append(f"{name}: {command}")
    print("\n".join(["", *ran]))
    workdirs = tmp_path / "workdirs"
    # Every method's results live under <workdir>/methods/<name>/, Arnoldi's included.
    for workdir in ("smoke", "mp", "smoke_p4", "digits", "digits_out"):
        arnoldi = workdirs / workdir / "methods" / "arnoldi"
        assert (arnoldi / "fit.json").exists(), workdir
        assert (arnoldi / "metrics.json").exists(), workdir
    # docs/large_models.md: a fit with the basis on disk, scored with G in host memory.
    assert list((workdirs / "offload" / "methods" / "arnoldi" / "scores" / "train").glob("*"))
    # The overrides that pick another method on the smoke run's params (docs/methods.md).
    for method in ("randproj", "lissa"):
        assert (workdirs / "smoke" / "methods" / method / "metrics.json").exists(), method
    # Another p̃ from the smoke run's params and Krylov state (docs/running.md): the top 4 of the
    # same 12 Krylov iterations.
    smoke, p4 = (
        json.loads((workdirs / w / "methods" / "arnoldi" / "fit.json").read_text())
        for w in ("smoke", "smoke_p4")
    )
    assert p4["num_iters_completed"] == smoke["num_iters_completed"] == 12, (smoke, p4)
    assert p4["eigvals"] == pytest.approx(smoke["eigvals"][:4], rel=1e-6), (smoke, p4)
    # The bring-your-own-model example: a task of its own, found by import path, finds its
    # flipped labels, over all parameters and over the output layer only.
    for workdir, covered in (
        ("digits", "2,410 of 2,410 parameters (4 of 4 leaves)"),
        ("digits_out", "330 of 2,410 parameters (2 of 4 leaves)"),
    ):
        results = workdirs / workdir / "methods" / "arnoldi"
        metrics = json.loads((results / "metrics.json").read_text())
        assert metrics["num_train"] == 1280 and metrics["auc"] > 0.9, (workdir, metrics)
        assert json.loads((results / "fit.json").read_text())["influence_over"] == covered
