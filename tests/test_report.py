"""The report job (stages/report.py) on the runlocal preset: its files, the paper's Figure 1
finding, reuse, and bad input."""

import json

import pandas as pd
import pytest

from stages import report
from tests.pipeline_helpers import copy_trained, run_job, run_module, tiny_config

# End-to-end runs of the jobs: the full suite only (launch/test.sh --fast skips them).
pytestmark = pytest.mark.slow


def test_figure1_arnoldi_finds_the_top_eigenvalues_randproj_does_not(tmp_path, runlocal_trained):
    """At a fixed full batch (every HVP on all 256 training examples) Arnoldi's top-p̃
    eigenvalues match the explicit Hessian's to 1e-3 relative for p̃ ≤ 50; RandProj's Ritz values
    of a random subspace are farther off at every p̃ (Schioppa et al. 2022, Figure 1)."""
    config = tiny_config(
        arnoldi__fixed_batch=True, arnoldi__hvp_batch_size=256, arnoldi__num_iters=150
    )
    config.report.methods = ("arnoldi", "randproj", "exact")
    config.report.top_ks = (10, 50)
    copy_trained(runlocal_trained, tmp_path)  # the report's train stage finds them
    result = report.run(config, tmp_path)
    for name in ("report.md", "report.json", "report_eigenvalues.png", "report_retrieval.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    figure = result["figure1"]
    assert max(figure["arnoldi"]["max_relative_error"]) <= 1e-3, figure
    for ours, theirs in zip(
        figure["arnoldi"]["wasserstein"], figure["randproj"]["wasserstein"], strict=True
    ):
        assert theirs > ours, figure
    labels = [row["label"] for row in result["rows"]]
    assert labels == ["arnoldi_p10", "arnoldi_p50", "randproj_p10", "randproj_p50", "exact"]
    exact = result["rows"][-1]
    assert exact["top_k"] == 2410 and abs(exact["spearman_reference"] - 1) < 1e-12
    assert result["ritz"]["converged"] == 50 and result["ritz"]["max_move"] < 1e-3
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    # The galleries show the configured method's run (Arnoldi, its largest p̃): the top 32 by
    # self-influence, captioned with the label trained on, and the traced queries' proponents.
    shown = json.loads((tmp_path / "gallery.json").read_text())
    assert shown["run"] == "arnoldi_p50" and (tmp_path / "gallery_self_influence.png").exists()
    scores = pd.read_parquet(
        tmp_path / "report" / "arnoldi_p50" / "methods" / "arnoldi" / "scores" / "train"
    )
    top = scores.sort_values("self_influence", ascending=False, kind="stable")["id"][:32]
    assert [row["id"] for row in shown["self_influence"]] == top.tolist()
    label = dict(zip(scores["id"], scores["label"], strict=True))
    for row in shown["self_influence"]:
        assert row["caption"].startswith(f"given {label[row['id']]}, pred "), row
    assert len(shown["queries"]) == 4
    assert all(len(q["proponents"]) == len(q["opponents"]) == 6 for q in shown["queries"])
    # A second report reuses every run (and reports the times of the runs that did the work).
    again = report.run(config, tmp_path)
    assert [r["fit_s"] for r in again["rows"]] == [r["fit_s"] for r in result["rows"]]
    assert again["figure1"] == figure
    # LDS of each of its runs (benchmarks/lds.py), smoke-run on 3 subset models.
    out = run_module(
        "benchmarks.lds",
        "--config=configs/mnist.py:runlocal",
        f"--report={tmp_path}",
        "--num_models=3",
        "--num_test=8",
    )
    lds = json.loads((tmp_path / "lds" / "lds.json").read_text())["lds"]
    assert sorted(lds) == sorted(labels) and "LDS" in out
    assert all(-1 <= v <= 1 for v in lds.values()), lds


def test_unknown_method_in_the_report_stops_before_training(tmp_path):
    done = run_job("report", tmp_path, "--config.report.methods=('arnoldi','lissa_typo')")
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "'lissa_typo' is not a method" in last, last
    assert not (tmp_path / "params").exists()
