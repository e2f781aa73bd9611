"""The README's commands run as written.

Every fenced ``bash`` block of README.md is run, command by command, in one scratch directory that
stands for the repository root (``configs/`` and ``examples/`` linked in, the package importable, ``python`` and
``.venv/bin/python`` the test's interpreter), in the order the README gives them, so later blocks
see the workdirs earlier ones made. Skipped, by their first line: blocks that need a pod or a
cluster (``# needs ...``; tests/test_launchers.py runs those scripts against stubs) and long
experiments (``# long: ...``; their results are in the README with their commands), and the
quick-start block (its second command is this test suite; a fresh clone runs both).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.pipeline_helpers import REPO, job_env

FENCE = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)


def readme_blocks() -> list[tuple[str, list[str]]]:
    """(first line, commands) of each bash block: continuation lines joined, comments dropped."""
    blocks = []
    for body in FENCE.findall((REPO / "README.md").read_text()):
        joined = re.sub(r"\\\n\s*", " ", body)
        commands = [re.split(r"\s{2,}#", line)[0].strip() for line in joined.splitlines()]
        blocks.append((body.splitlines()[0], [c for c in commands if c and not c.startswith("#")]))
    return blocks


def runnable(first_line: str, commands: list[str]) -> bool:
    skipped = first_line.startswith(("# needs", "# long"))
    return not skipped and not any("launch/test.sh" in c for c in commands)


def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    blocks = readme_blocks()
    to_run = [commands for first, commands in blocks if runnable(first, commands)]
    assert len(blocks) >= 8 and len(to_run) >= 3, "the README lost its commands?"
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
    for commands in to_run:
        for command in commands:
            done = subprocess.run(
                ["bash", "-c", command],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
            ran.append(command)
    print("\n".join(["", *ran]))
    for workdir in ("mnist", "smoke", "mp", "mnist_p100", "digits", "digits_out"):
        assert (tmp_path / "workdirs" / workdir / "eigenvalues.json").exists(), workdir
    assert (tmp_path / "workdirs" / "mnist_p100" / "metrics.json").exists()
    # The bring-your-own-model example: a task of its own, found by import path, finds its
    # flipped labels, over all parameters and over the output layer only.
    for workdir, covered in (
        ("digits", "2,410 of 2,410 parameters (4 of 4 leaves)"),
        ("digits_out", "330 of 2,410 parameters (2 of 4 leaves)"),
    ):
        results = tmp_path / "workdirs" / workdir
        metrics = json.loads((results / "metrics.json").read_text())
        assert metrics["num_train"] == 1280 and metrics["auc"] > 0.9, (workdir, metrics)
        assert json.loads((results / "eigenvalues.json").read_text())["influence_over"] == covered
