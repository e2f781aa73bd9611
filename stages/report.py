"""The report job: the paper's comparison of methods on the current task, in the workdir.

    python -m jobs.report --config=configs/mnist.py:runlocal --workdir=W

Trains (or reuses) the task's params in W, then runs every method of ``report.methods`` at every
p̃ of ``report.top_ks`` (Arnoldi, RandProj, RandSelect) or once (exact, graddot), each as the
fit → score → evaluate stages in its own workdir ``W/report/<method>[_p<p̃>]`` that links W's
params (and, for Arnoldi, W's Krylov state: one Krylov run serves every p̃), so every result is
cached and fingerprinted like a user's run and a second report reuses all of it. Writes

- ``report.md`` / ``report.json``: Table 1 (Schioppa et al. 2022): method, p̃, fit and scoring
  time, AUC, AP, recall at 10% / 20% inspected, Spearman with ``exact`` where it is feasible;
- ``report_eigenvalues.png`` (Figure 1): the Wasserstein-1 distance between each method's top-p̃
  eigenvalue estimates and the exact top p̃, against p̃;
- ``report_retrieval.png`` (Figure 2): AUC and AP against p̃, the single-fit methods as lines;
- Ritz diagnostics in words (``stages/report_text.py``): how many kept pairs converged, how far
  the top eigenvalues move under a second ``arnoldi.seed``, and what to raise.

``exact`` is skipped, with a note, when the model has more than ``method.max_params`` params.
"""

import os
import time
from typing import Any

import ml_collections
import numpy as np
import pandas as pd
from absl import logging
from etils import epath
from jax.sharding import Mesh
from scipy import stats

from methods import registry
from runtime import outputs
from runtime.errors import InputError
from stages import artifacts, checks, evaluate, fit, gallery, report_text, score, train
from stages import workdir as wd
from stages.report_text import SWEPT
from stages.setup import Stage, check_all


def _feasible(config: ml_collections.ConfigDict, workdir: epath.Path, methods: list[str], p: int):
    """(the methods that can run on this task, notes on those that cannot)."""
    notes = []
    if "exact" in methods and p > config.method.max_params:
        methods.remove("exact")
        notes.append(
            f"exact skipped: {p:,} params exceed method.max_params={config.method.max_params:,}"
        )
    if "tracin" in methods and not config.train.keep_epochs:
        methods.remove("tracin")
        notes.append("tracin skipped: train.keep_epochs keeps no checkpoints")
    kept = workdir / wd.EPOCH_PARAMS
    have = {int(d.name) for d in kept.iterdir() if d.name.isdigit()} if kept.exists() else set()
    if "tracin" in methods and not set(config.train.keep_epochs) <= have:
        methods.remove("tracin")
        notes.append(
            "tracin skipped: the params in this workdir were trained without "
            f"train.keep_epochs={tuple(config.train.keep_epochs)} (report in a new workdir)"
        )
    return methods, notes


def check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    r = config.report
    for name in r.methods:
        if name == "tracin" and not config.train.keep_epochs:
            continue  # skipped by the report, with a note
        method = registry.get(name)
        probe = _variant(config, name, max(r.top_ks) if name in SWEPT else None)
        method.check(probe, mesh)
    if not r.top_ks or min(r.top_ks) < 1:
        raise InputError(f"report.top_ks={tuple(r.top_ks)} must be positive p̃ values")
    if "arnoldi" in r.methods and max(r.top_ks) > config.arnoldi.num_iters:
        raise InputError(
            f"report.top_ks={tuple(r.top_ks)}: p̃ ≤ arnoldi.num_iters={config.arnoldi.num_iters} "
            "for Arnoldi; lower the largest p̃ or raise arnoldi.num_iters"
        )
    if not 0 < r.converged_tol < 1:
        raise InputError(f"report.converged_tol={r.converged_tol} must be in (0, 1)")
    checks.check_score(config, mesh)


CHECK = check


def _variant(config: ml_collections.ConfigDict, method: str, top_k: int | None, **arnoldi: Any):
    sub = config.copy_and_resolve_references()
    sub.method.name = method
    if top_k is not None:
        sub.distill.top_k = top_k
    for key, value in arnoldi.items():
        sub.arnoldi[key] = value
    return sub


def _link(workdir: epath.Path, sub: epath.Path, names: tuple[str, ...]) -> None:
    """``sub`` shares ``names`` of ``workdir`` (read by the stages, never rewritten: their
    fingerprints match, so they are reused as they are)."""
    sub.mkdir(parents=True, exist_ok=True)
    for name in names:
        source, target = workdir / name, sub / name
        if source.exists() and not target.exists():  # absolute: a relative --workdir works
            os.symlink(os.path.abspath(os.fspath(source)), os.fspath(target))


TIMES = "report_times.json"


def _timed(stages: dict[str, Any], config, workdir: epath.Path) -> dict[str, float]:
    """Run each stage and time it; the times of the run that did the work are kept in the
    variant's workdir, so a report that reuses the results reports those, not the reuse."""
    saved = outputs.read_json(workdir / TIMES) if (workdir / TIMES).exists() else {}
    for name, stage_run in stages.items():
        start = time.perf_counter()
        stage_run(config, workdir)
        saved.setdefault(name, time.perf_counter() - start)
        outputs.write_json(workdir / TIMES, saved)
    return saved


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, Any]:
    workdir, r = epath.Path(workdir), config.report
    check_all(config, [train.CHECK, check])
    if "://" in os.fspath(workdir):
        raise InputError(
            f"--workdir={workdir}: the report links its runs' shared params and Krylov state "
            "with symlinks, so it needs a local (or mounted) workdir; copy the workdir there"
        )
    train.run(config, workdir)
    stage = Stage.setup(_variant(config, "graddot", None), workdir, fit.CHECK)
    p = stage.selection.num_params(stage.params_like)
    methods, notes = _feasible(config, workdir, list(r.methods), p)
    variants = [
        (name, k) for name in methods for k in (sorted(r.top_ks) if name in SWEPT else [None])
    ]
    (workdir / wd.KRYLOV).mkdir(exist_ok=True)  # one Krylov run for every Arnoldi p̃
    rows, self_influence = [], {}
    for name, k in variants:
        sub = _variant(config, name, k)
        label = name if k is None else f"{name}_p{k}"
        directory = workdir / "report" / label
        _link(workdir, directory, (wd.PARAMS, wd.CORRUPTED, wd.KRYLOV, wd.EPOCH_PARAMS))
        logging.info("report: %s", label)
        try:
            times = _timed({"fit": fit.run, "score": score.run}, sub, directory)
        except InputError as e:  # one method's bad fit (a diverged LiSSA) is a note, not the end
            logging.warning("report: %s failed: %s", label, e)
            notes.append(f"{label} failed: {e}")
            continue
        metrics = evaluate.run(sub, directory)
        path = lambda name, sub=sub, directory=directory: wd.result_path(sub, directory, name)  # noqa: E731
        table = pd.read_parquet(path(wd.SCORES) / "train").set_index("id").sort_index()
        ranked = evaluate.ranking_scores(list(table.columns), lambda c, t=table: t[c])
        self_influence[label] = pd.Series(ranked[metrics["ranked_by"]], index=table.index)
        eig = path(wd.EIGENVALUES_JSON)
        rows.append(
            {
                "label": label,
                "method": name,
                "top_k": len(outputs.read_json(path(wd.SCORES_META))["eigvals"]),
                "fit_s": times["fit"],
                "score_s": times["score"],
                **{m: metrics[m] for m in ("auc", "ap", "recall_at_10pct", "recall_at_20pct")},
                "eigvals": outputs.read_json(eig)["eigvals"] if eig.exists() else None,
                "eig_file": str(eig) if eig.exists() else None,
            }
        )
    if "exact" in self_influence:
        for row in rows:
            rho = stats.spearmanr(self_influence[row["label"]], self_influence["exact"])
            row["spearman_exact"] = float(rho.statistic)
    seeds = _seed_spread(config, workdir) if "arnoldi" in methods else None
    report = {
        "task": config.task,
        "model": config.model,
        "num_params": p,
        "num_train": stage.split("train").num_examples,
        "rows": [{k: v for k, v in row.items() if k != "eigvals"} for row in rows],
        "figure1": report_text.eigenvalue_errors(rows, sorted(r.top_ks)),
        "ritz": report_text.ritz_diagnostics(rows, seeds, r.converged_tol, config),
        "notes": notes,
    }
    report["gallery"] = _gallery(config, workdir, rows)
    outputs.write_json(workdir / "report.json", report)
    report_text.plot_eigenvalue_errors(workdir / "report_eigenvalues.png", report["figure1"])
    report_text.plot_retrieval(workdir / "report_retrieval.png", report["rows"])
    (workdir / "report.md").write_text(report_text.markdown(report))
    logging.info("report written to %s", workdir / "report.md")
    return report


def _gallery(config: ml_collections.ConfigDict, workdir: epath.Path, rows: list[dict]) -> str:
    """Galleries (``stages/gallery.py``) of the configured method's run (its largest p̃)."""
    name = config.method.name
    runs = [r for r in rows if r["method"] == name] or rows[:1]
    label = max(runs, key=lambda r: r["top_k"])["label"]
    sub = _variant(config, runs[0]["method"], None)
    directory = workdir / "report" / label
    stage = Stage.setup(sub, directory, fit.CHECK)
    params, _ = artifacts.restore_params(stage)
    gallery.write(stage, params, wd.result_path(sub, directory, wd.SCORES), workdir, label)
    return label


def _seed_spread(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict[str, Any]:
    """Arnoldi's top eigenvalues under ``arnoldi.seed`` and the next seed (fit only)."""
    k = max(config.report.top_ks)
    values = []
    for seed in (config.arnoldi.seed, config.arnoldi.seed + 1):
        sub = _variant(config, "arnoldi", k, seed=seed)
        directory = workdir / "report" / f"arnoldi_p{k}_seed{seed}"
        links = (wd.PARAMS, wd.CORRUPTED) + ((wd.KRYLOV,) if seed == config.arnoldi.seed else ())
        _link(workdir, directory, links)
        fit.run(sub, directory)
        values.append(np.asarray(outputs.read_json(directory / wd.EIGENVALUES_JSON)["eigvals"]))
    return {"seeds": [config.arnoldi.seed, config.arnoldi.seed + 1], "eigvals": values}
