"""benchmarks/convergence.py runs (a smoke run on one tiny matrix): its two tables, the PNG, and a
JSON whose curves say what the full run shows. Timings are never asserted."""

import json
import re
from pathlib import Path

import pytest

from tests.pipeline_helpers import run_module as run


@pytest.mark.slow
def test_convergence_benchmark_prints_tables_and_writes_curves(tmp_path: Path) -> None:
    out = run(
        "benchmarks.convergence",
        "--dims=32",
        "--num_samples=16",
        "--max_iters=20",
        "--lissa_depth=20",
        "--arnoldi_iters=8",
        f"--out={tmp_path}",
    )
    assert re.search(r"^\| 32 \| 16 \| [0-9.e+]+ \|( [0-9.e+-]+ \|){6}$", out, re.M)
    assert re.search(r"^\| 32 \| 16 \|( [0-9–]+ / [0-9–]+ \([0-9.]+ s\) \|){4} 0 \(", out, re.M)
    assert (tmp_path / "convergence.png").stat().st_size > 10_000
    (row,) = json.loads((tmp_path / "convergence.json").read_text())
    schulz, reference = row["curves"]["schulz"], row["curves"]["schulz_reference"]
    assert min(schulz) < 1e-4  # the default start reaches the float32 floor in 20 iterations
    assert len(reference) == 21 and reference[-1] > 1e-2  # 5e-5·I has not started converging
    assert len(row["curves"]["lissa"]) == 21
    assert [m for m, _ in row["arnoldi"]["arnoldi_damping"]][-1] == 8
