"""The report job: the paper's comparison of methods on the current task, in the workdir.

    python -m jobs.report --config=configs/mnist.py:runlocal --workdir=W

Trains (or reuses) the task's params in W, then runs every method of ``report.methods``, those
that keep p̃ eigenpairs (``Method.keeps_top_k``) at every p̃ of ``report.top_ks``, the others
once, each as the fit → score → evaluate stages in its own workdir ``W/report/<method>[_p<p̃>]``
that links W's params (and a method's shared fit state, ``Method.state``: one Krylov run serves
every p̃ of Arnoldi), so every result is cached and fingerprinted like a user's run and a second
report reuses all of it. Writes

- ``report.md`` / ``report.json``: Table 1 (Schioppa et al. 2022): method, p̃, fit and scoring
  time, AUC, AP, recall at 10% / 20% inspected, Spearman with the reference method (exact,
  ``Method.reference``) where it is feasible;
- ``report_eigenvalues.png`` (Figure 1): the Wasserstein-1 distance between each method's top-p̃
  eigenvalue estimates and the exact top p̃, against p̃;
- ``report_retrieval.png`` (Figure 2): AUC and AP against p̃, the single-fit methods as lines;
- Ritz diagnostics in words (``stages/report_text.py``): how many kept pairs of the first method
  with a ``seed_field`` converged, how far its top eigenvalues move under a second seed, and what
  to raise.

A method that cannot run on this task (exact on a model larger than ``method.max_params``,
tracin without kept checkpoints) is skipped with a note, as is one whose fit or scoring stops
with an error (a LiSSA that diverges).
"""

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import pandas as pd
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from scipy import stats

from methods import registry
from methods.base import Context, Kind, Method
from runtime import outputs, workdir
from runtime.errors import InputError
from stages import artifacts, checks, evaluate, fit, gallery, report_text, score, train
from stages.setup import check_all, context

TIMES = "report_times.json"


def check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    r = config.report
    if not r.top_ks or min(r.top_ks) < 1:
        raise InputError(f"report.top_ks={tuple(r.top_ks)} must be positive p̃ values")
    for name in r.methods:
        method = registry.get(name)
        if method.checkpoints and not config.train.keep_epochs:
            continue  # skipped by the report, with a note
        try:
            method.check(_variant(config, method, max(r.top_ks)), mesh)
        except InputError as e:
            if method.keeps_top_k:
                raise InputError(f"report.top_ks={tuple(r.top_ks)}: {e}") from e
            raise
    if not 0 < r.converged_tol < 1:
        raise InputError(f"report.converged_tol={r.converged_tol} must be in (0, 1)")
    checks.check_score(config, mesh)


CHECK = check


def _variant(config: ml_collections.ConfigDict, method: Method, top_k: int, **fields: Any):
    """``config`` for ``method`` (at p̃ = ``top_k`` if it keeps p̃ eigenpairs), with other fields
    (dotted names with '__' for '.') set. ``distill.tail`` is kept for the eigenpair methods only:
    the others approximate H⁻¹ in every direction, there is no subspace to add a tail to."""
    sub = config.copy_and_resolve_references()
    sub.method.name = method.name
    if method.kind is not Kind.EIGENPAIR:
        sub.distill.tail = "none"
    if method.keeps_top_k:
        sub.distill.top_k = top_k
    for dotted, value in fields.items():
        block, field = dotted.split("__")
        sub[block][field] = value
    return sub


def _feasible(ctx: Context, methods: list[Method]) -> tuple[list[Method], list[str]]:
    """(the methods that can run on this task, notes on those that cannot)."""
    kept_dir = ctx.workdir / workdir.EPOCH_PARAMS
    have = (
        {int(d.name) for d in kept_dir.iterdir() if d.name.isdigit()}
        if kept_dir.exists()
        else set()
    )
    feasible, notes = [], []
    for method in methods:
        try:
            if method.check_size is not None:
                method.check_size(ctx.config, ctx.vectors_like)
        except InputError as e:
            notes.append(f"{method.name} skipped: {e}")
            continue
        if method.checkpoints and not ctx.config.train.keep_epochs:
            notes.append(f"{method.name} skipped: train.keep_epochs keeps no checkpoints")
            continue
        if method.checkpoints and not set(ctx.config.train.keep_epochs) <= have:
            notes.append(
                f"{method.name} skipped: the params in this workdir were trained without "
                f"train.keep_epochs={tuple(ctx.config.train.keep_epochs)} (report in a new workdir)"
            )
            continue
        feasible.append(method)
    return feasible, notes


def _link(source: epath.Path, sub: epath.Path, names: list[str]) -> None:
    """``sub`` shares ``names`` (relative paths) of ``source`` (read by the stages, never
    rewritten: their fingerprints match, so they are reused as they are): symlinks on a local
    or mounted filesystem, copies on an object store (``gs://``), which has no links. Process 0
    makes them, the others wait for it (several processes creating one link race)."""
    workdir.claim(sub)
    if jax.process_index() == 0:
        for name in names:
            origin, target = source / name, sub / name
            if not origin.exists() or target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if "://" in os.fspath(origin):
                _copy_tree(origin, target)
            else:  # absolute: a relative --workdir works
                os.symlink(os.path.abspath(os.fspath(origin)), os.fspath(target))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"influence:report-links {sub}")


def _copy_tree(origin: epath.Path, target: epath.Path) -> None:
    """Copy a file or a directory tree (any epath; object stores list one level at a time)."""
    if not origin.is_dir():
        origin.copy(target)
        return
    target.mkdir(parents=True, exist_ok=True)
    for child in origin.iterdir():
        _copy_tree(child, target / child.name)


def _shared(method: Method) -> list[str]:
    """What a variant of ``method`` links from W: the trained params, the ground truth, the kept
    epochs, and the method's shared fit state (created in W first, so every variant writes it
    there)."""
    return [
        workdir.PARAMS,
        workdir.CORRUPTED,
        workdir.EPOCH_PARAMS,
        *(f"{workdir.METHODS}/{method.name}/{state}" for state in method.state),
    ]


def _timed(stages: dict[str, Any], config, directory: epath.Path) -> dict[str, float]:
    """Run each stage and time it; the times of the run that did the work are kept in the
    variant's workdir, so a report that reuses the results reports those, not the reuse."""
    saved = outputs.read_json(directory / TIMES) if (directory / TIMES).exists() else {}
    for name, stage_run in stages.items():
        start = time.perf_counter()
        stage_run(config, directory)
        saved.setdefault(name, time.perf_counter() - start)
        outputs.write_json(directory / TIMES, saved)
    return saved


def _row(method: Method, label: str, directory: epath.Path, times: dict, metrics: dict):
    """The report's row of one run, and its ranking scores by id."""
    results = workdir.results(directory, method.name)
    table = pd.read_parquet(results / workdir.SCORES / "train").set_index("id").sort_index()
    ranked = evaluate.ranking_scores(list(table.columns), lambda c: table[c])
    eig = results / workdir.FIT_JSON
    fitted = outputs.read_json(eig) if eig.exists() else {}  # graddot fits nothing
    eig_file = str(eig) if "eigvals" in fitted else None  # an operator's fit has no eigenpairs
    row = {
        "label": label,
        "method": method.name,
        "swept": method.keeps_top_k,
        "reference": method.reference,
        "top_k": len(outputs.read_json(results / workdir.SCORES_META)["eigvals"]),
        "fit_s": times["fit"],
        "score_s": times["score"],
        **{m: metrics[m] for m in ("auc", "ap", "recall_at_10pct", "recall_at_20pct")},
        **{m: v for m, v in metrics.items() if m.startswith("query_")},  # fact tracing
        "eigvals": fitted.get("eigvals"),
        "eig_file": eig_file,
    }
    return row, pd.Series(ranked[metrics["ranked_by"]], index=table.index)


def _runs(config, directory: epath.Path, methods: list[Method], notes: list[str]):
    """Every variant's fit → score → evaluate: (rows, ranking scores by label)."""
    rows, rankings = [], {}
    top_ks = sorted(config.report.top_ks)
    for method in methods:
        for state in method.state:  # one shared state for every variant, created in W
            (workdir.results(directory, method.name) / state).mkdir(parents=True, exist_ok=True)
        for k in top_ks if method.keeps_top_k else [None]:
            sub = _variant(config, method, k)
            label = method.name if k is None else f"{method.name}_p{k}"
            sub_dir = directory / "report" / label
            _link(directory, sub_dir, _shared(method))
            logging.info("report: %s", label)
            try:
                times = _timed({"fit": fit.run, "score": score.run}, sub, sub_dir)
            except InputError as e:  # one method's bad fit (a diverged LiSSA) is a note
                logging.warning("report: %s failed: %s", label, e)
                notes.append(f"{label} failed: {e}")
                continue
            metrics = evaluate.run(sub, sub_dir)
            row, ranking = _row(method, label, sub_dir, times, metrics)
            rows.append(row)
            rankings[label] = ranking
    return rows, rankings


def run(config: ml_collections.ConfigDict, directory: epath.PathLike) -> dict[str, Any]:
    directory, r = epath.Path(directory), config.report
    check_all(config, [train.CHECK, check])
    train.run(config, directory)
    ctx = context(config, directory, fit.CHECK, size_check=False)  # each method's: _feasible
    methods, notes = _feasible(ctx, [registry.get(name) for name in r.methods])
    rows, rankings = _runs(config, directory, methods, notes)
    reference = next((row["label"] for row in rows if row["reference"]), None)
    if reference is not None:
        for row in rows:
            rho = stats.spearmanr(rankings[row["label"]], rankings[reference])
            row["spearman_reference"] = float(rho.statistic)
    diagnosed = next((m for m in methods if m.seed_field and m.keeps_top_k), None)
    seeds = _seed_spread(config, directory, diagnosed) if diagnosed else None
    report = {
        "task": config.task,
        "model": config.model,
        "num_params": ctx.selection.num_params(ctx.params_like),
        "num_train": ctx.split("train").num_examples,
        "rows": [{k: v for k, v in row.items() if k != "eigvals"} for row in rows],
        "figure1": report_text.eigenvalue_errors(rows, sorted(r.top_ks)),
        "ritz": report_text.ritz_diagnostics(rows, seeds, r.converged_tol, diagnosed, config)
        if diagnosed
        else {},
        "notes": notes,
        "gallery": _gallery(config, directory, rows),
    }
    outputs.write_json(directory / "report.json", report)
    report_text.plot_eigenvalue_errors(directory / "report_eigenvalues.png", report["figure1"])
    report_text.plot_retrieval(directory / "report_retrieval.png", report["rows"])
    (directory / "report.md").write_text(report_text.markdown(report))
    logging.info("report written to %s", directory / "report.md")
    return report


def _gallery(config: ml_collections.ConfigDict, directory: epath.Path, rows: list[dict]) -> str:
    """Galleries (``stages/gallery.py``) of the configured method's run (its largest p̃)."""
    runs = [r for r in rows if r["method"] == registry.of(config).name] or rows[:1]
    label = max(runs, key=lambda r: r["top_k"])["label"]
    method = registry.get(runs[0]["method"])
    sub = _variant(config, method, max(r["top_k"] for r in runs))
    ctx = context(sub, directory / "report" / label, fit.CHECK)
    params, _ = artifacts.restore_params(ctx)
    gallery.write(ctx, params, ctx.results / workdir.SCORES, directory, label)
    return label


def _seed_spread(config: ml_collections.ConfigDict, directory: epath.Path, method: Method):
    """The method's top eigenvalues under its seed and the next one (fit only)."""
    k = max(config.report.top_ks)
    block, field = method.seed_field.split(".")
    first = config[block][field]
    values = []
    for seed in (first, first + 1):
        sub = _variant(config, method, k, **{f"{block}__{field}": seed})
        sub_dir = directory / "report" / f"{method.name}_p{k}_seed{seed}"
        names = _shared(method) if seed == first else [workdir.PARAMS, workdir.CORRUPTED]
        _link(directory, sub_dir, names)
        fit.run(sub, sub_dir)
        fitted = outputs.read_json(workdir.results(sub_dir, method.name) / workdir.FIT_JSON)
        values.append(np.asarray(fitted["eigvals"]))
    return {"seeds": [first, first + 1], "eigvals": values}
