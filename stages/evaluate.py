"""The evaluate job: mislabeled-example retrieval from self-influence (paper §5.1 protocol).

Training examples are ranked by self-influence; the ones whose label was flipped are the positives.
Writes metrics.json (AUC, AP, recall when inspecting the top x%), roc_pr.png and spectrum.png.
With ``score.validation`` the ranking by harm to the mean validation loss (−validation_influence,
the DataInf / HyperINF protocol) is reported beside it (``*_validation``); with ``distill.tail``
the tail-corrected self-influence (``*_tail``). For a task with a ``relevance_column`` (the LM's
planted facts), each traced query's ranking of the training examples is measured against the ones
relevant to it (``scoring/retrieval.py``): ``query_retrieval.json`` per query, the means in
metrics.json (``query_*``, ``query_*_tail``).
"""

import matplotlib

matplotlib.use("Agg")

from typing import Any

import jax
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from influence import metrics
from methods import registry
from runtime import outputs, workdir
from runtime.errors import InputError
from runtime.tensorboard import ScalarWriter
from scoring import retrieval

INSPECT_FRACTIONS = (0.05, 0.1, 0.2, 0.3)
# The rankings of the training examples a scores directory may hold, the first present the
# primary one: column → how the plots name it; SUFFIXES: the metrics' suffix of the others.
RANKINGS = {
    "self_influence": "self-influence",
    "self_influence_tail": "self-influence + tail",
    "validation_influence": "harm to the validation loss",
}
SUFFIXES = {"self_influence_tail": "tail", "validation_influence": "validation"}


def ranking_scores(columns: list[str], read) -> dict[str, np.ndarray]:
    """{ranking: scores, high = likely corrupted} for the rankings present among ``columns``
    (``read(column)`` gives its values): self-influence, the tail-corrected one, and the harm to
    the validation loss, −⟨∇ℓ(x), P v̄⟩ (up-weighting a flipped label raises the validation
    loss: its influence on it is negative; Kwon et al. 2023; Zhou et al. 2024)."""
    found = {}
    for name in RANKINGS:
        if name in columns:
            values = np.asarray(read(name), np.float64)
            found[name] = -values if name == "validation_influence" else values
    return found


def retrieval_metrics(flipped: np.ndarray, self_influence: np.ndarray) -> dict[str, float]:
    order = np.argsort(-self_influence, kind="mergesort")
    found = np.cumsum(flipped[order]) / max(int(flipped.sum()), 1)
    result = {
        "auc": metrics.roc_auc(flipped, self_influence),
        "ap": metrics.average_precision(flipped, self_influence),
        "random_ap": float(flipped.mean()),
    }
    for fraction in INSPECT_FRACTIONS:
        result[f"recall_at_{round(fraction * 100)}pct"] = float(
            found[round(fraction * flipped.size) - 1]
        )
    return result


def _plot_retrieval(
    path: epath.Path, flipped: np.ndarray, scores: np.ndarray, m: dict, ranked_by: str
) -> None:
    c = metrics.curves(flipped, scores)
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(9, 4))
    name = RANKINGS[ranked_by]
    roc.plot(c.fpr, c.tpr, label=f"{name} (AUC {m['auc']:.3f})")
    roc.plot([0, 1], [0, 1], "k--", lw=0.8, label="random")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC: flipped labels")
    pr.plot(c.recall, c.precision, label=f"{name} (AP {m['ap']:.3f})")
    pr.axhline(m["random_ap"], color="k", ls="--", lw=0.8, label="random")
    pr.set(xlabel="recall", ylabel="precision", title="precision–recall", ylim=(0, 1.02))
    for ax in (roc, pr):
        ax.legend(loc="lower right" if ax is roc else "lower left")
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def _plot_spectrum(path: epath.Path, eig: dict) -> None:
    ritz = np.asarray(eig["all_ritz_values"])
    kept = np.asarray(eig["eigvals"])
    order = np.argsort(-np.abs(ritz))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(np.arange(1, ritz.size + 1), np.abs(ritz[order]), ".", label="|Ritz value|")
    ax.semilogy(
        np.arange(1, kept.size + 1), np.abs(kept), "o", mfc="none", label=f"kept (p̃={kept.size})"
    )
    neg = ritz[order] < 0
    if neg.any():
        ax.semilogy(np.nonzero(neg)[0] + 1, np.abs(ritz[order][neg]), "rx", label="negative λ")
    ax.set(
        xlabel="rank by |λ|",
        ylabel="|λ|",
        title=f"Hessian spectrum ({eig['method']}, {eig['num_hvps']} HVPs)",
    )
    ax.legend()
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def _read_scores(directory: epath.Path, config: ml_collections.ConfigDict) -> tuple[dict, Any]:
    """(the scores' meta, the training scores table), after checking there is something to
    rank and a corruption column to retrieve."""
    scores_dir = directory / workdir.SCORES / "train"
    if not (directory / workdir.SCORES_META).exists() or not list(
        scores_dir.glob("part-*.parquet")
    ):
        raise InputError(
            f"no scores in {scores_dir}; run `python -m jobs.fit` and `python -m jobs.score` "
            "with the same --config and --workdir first"
        )
    scores_meta = outputs.read_json(directory / workdir.SCORES_META)
    if not scores_meta.get("corruption_column"):
        raise InputError(
            f"task {config.task!r} marks no corrupted training examples, so there is nothing to "
            "retrieve; evaluate needs a task with a corruption_column (tasks/base.py)"
        )
    return scores_meta, outputs.read_parquet_dir(scores_dir)


def run(config: ml_collections.ConfigDict, directory: epath.PathLike) -> dict[str, float]:
    workdir.check(directory)
    results = workdir.results(directory, registry.of(config).name)
    scores_meta, table = _read_scores(results, config)
    corruption = scores_meta["corruption_column"]
    flipped = table.column(corruption).to_numpy(zero_copy_only=False).astype(bool)
    if not flipped.any():
        raise InputError(
            f"no corrupted examples ({corruption!r}) in the training split: raise the task's "
            "corruption fraction (MNIST: data.flip_fraction > 0)"
        )
    rankings = ranking_scores(table.column_names, lambda c: table.column(c).to_numpy())
    if not rankings:
        raise InputError(
            f"the scores in {results / workdir.SCORES} have neither self_influence nor "
            "validation_influence to rank by: score with score.self_influence=true or "
            "score.validation=true"
        )
    (ranked_by, scores), *others = rankings.items()
    fit_json = results / workdir.FIT_JSON
    eig = outputs.read_json(fit_json) if fit_json.exists() else None  # graddot fits nothing
    m = retrieval_metrics(flipped, scores)
    result = {
        **m,
        "ranked_by": ranked_by,
        "num_train": int(flipped.size),
        "num_flipped": int(flipped.sum()),
        "method": scores_meta["method"],
        "top_k": len(scores_meta["eigvals"]),
        "model": config.model,
    }
    if eig is not None and "num_iters_completed" in eig:
        result["num_iters"] = eig["num_iters_completed"]
    for name, values in others:  # the other rankings side by side: *_tail, *_validation
        other = retrieval_metrics(flipped, values)
        result.update({f"{k}_{SUFFIXES[name]}": v for k, v in other.items() if k != "random_ap"})
        logging.info("ranked by %s: AUC %.4f, AP %.4f", name, other["auc"], other["ap"])
    result.update(_query_retrieval(results, config, scores_meta))
    if jax.process_index() == 0:
        _write(results, result, flipped, scores, m, eig)
    logging.info(
        "mislabeled retrieval by %s: AUC %.4f, AP %.4f (random AP %.3f)",
        ranked_by,
        m["auc"],
        m["ap"],
        m["random_ap"],
    )
    return result


def _query_retrieval(
    results: epath.Path, config: ml_collections.ConfigDict, scores_meta: dict
) -> dict[str, float]:
    """The traced queries' retrieval of their relevant training examples (mean recall@10, MRR,
    AUC per ranking), with the per-query rows in ``query_retrieval.json``; {} for a task without
    a relevance column or a run that traced no query."""
    column, num_queries = scores_meta.get("relevance_column"), config.score.num_queries
    if not column or not num_queries:
        return {}
    rows = retrieval.retrieval(
        results / workdir.SCORES,
        np.asarray(scores_meta["eigvals"], np.float32),
        num_queries,
        column,
        scores_meta.get("tail_sigma"),
        bool(scores_meta.get("intrinsic_sigma")),
    )
    means = {}
    for name, per_query in rows.items():
        suffix = "_tail" if name.endswith("_tail") else ""
        for key in ("recall_at_10", "mrr", "auc"):
            means[f"query_{key}{suffix}"] = float(np.mean([r[key] for r in per_query]))
        logging.info(
            "%d traced queries' relevant training examples (%s) by %s: recall@10 %.3f, MRR %.3f, "
            "AUC %.3f", len(per_query), column, name, *(means[f"query_{k}{suffix}"]
            for k in ("recall_at_10", "mrr", "auc")),
        )  # fmt: skip
    if jax.process_index() == 0 and rows:
        outputs.write_json(results / workdir.QUERY_RETRIEVAL_JSON, rows)
    return means


def _write(
    results: epath.Path, result: dict, flipped: np.ndarray, scores: np.ndarray, m: dict, eig: Any
) -> None:
    """metrics.json, the ROC/PR curves, the spectrum (eigenpair methods) and TensorBoard."""
    outputs.write_json(results / workdir.METRICS_JSON, result)
    _plot_retrieval(results / workdir.ROC_PR_PNG, flipped, scores, m, result["ranked_by"])
    if eig is not None and "all_ritz_values" in eig:  # the eigenpair methods
        _plot_spectrum(results / workdir.SPECTRUM_PNG, eig)
    writer = ScalarWriter(results / "tensorboard" / "evaluate")
    writer.write_scalars(0, {f"evaluate/{k}": v for k, v in m.items()})
    writer.close()
