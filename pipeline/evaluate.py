"""The evaluate job: mislabeled-example retrieval from self-influence (paper §5.1 protocol).

Training examples are ranked by self-influence; the ones whose label was flipped are the positives.
Writes metrics.json (AUC, AP, recall when inspecting the top x%), roc_pr.png and spectrum.png.
"""

import matplotlib

matplotlib.use("Agg")

import jax
import matplotlib.pyplot as plt
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from influence import metrics
from pipeline import outputs
from pipeline import workdir as wd
from pipeline.errors import InputError
from pipeline.tensorboard import ScalarWriter

INSPECT_FRACTIONS = (0.05, 0.1, 0.2, 0.3)


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


def _plot_retrieval(path: epath.Path, flipped: np.ndarray, scores: np.ndarray, m: dict) -> None:
    c = metrics.curves(flipped, scores)
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(9, 4))
    roc.plot(c.fpr, c.tpr, label=f"self-influence (AUC {m['auc']:.3f})")
    roc.plot([0, 1], [0, 1], "k--", lw=0.8, label="random")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC: flipped labels")
    pr.plot(c.recall, c.precision, label=f"self-influence (AP {m['ap']:.3f})")
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
        title=f"Hessian spectrum ({eig.get('method', 'arnoldi')}, "
        f"{eig.get('num_iters_completed', eig.get('num_hvps'))} HVPs)",
    )
    ax.legend()
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict[str, float]:
    path = lambda name: wd.result_path(config, workdir, name)  # noqa: E731
    scores_dir = path(wd.SCORES) / "train"
    eig_path = path(wd.EIGENVALUES_JSON)
    if not path(wd.SCORES_META).exists() or not list(scores_dir.glob("part-*.parquet")):
        fit = "jobs.arnoldi" if wd.method_name(config) == "arnoldi" else "jobs.fit"
        raise InputError(
            f"no scores in {scores_dir}; run `python -m {fit}` and `python -m jobs.score` "
            "with the same --config and --workdir first"
        )
    scores_meta = outputs.read_json(path(wd.SCORES_META))
    corruption = scores_meta.get("corruption_column")
    if not corruption:
        raise InputError(
            f"task {config.task!r} marks no corrupted training examples, so there is nothing to "
            "retrieve; evaluate needs a task with a corruption_column (tasks/base.py)"
        )
    table = outputs.read_parquet_dir(scores_dir)
    flipped = table.column(corruption).to_numpy(zero_copy_only=False).astype(bool)
    self_influence = table.column("self_influence").to_numpy()
    if not flipped.any():
        raise InputError(
            f"no corrupted examples ({corruption!r}) in the training split: raise the task's "
            "corruption fraction (MNIST: data.flip_fraction > 0)"
        )
    eig = outputs.read_json(eig_path) if eig_path.exists() else None  # graddot fits nothing
    m = retrieval_metrics(flipped, self_influence)
    result = {
        **m,
        "num_train": int(flipped.size),
        "num_flipped": int(flipped.sum()),
        "method": scores_meta.get("method", "arnoldi"),
        "top_k": len(scores_meta["eigvals"]),
        "model": config.model,
    }
    if eig is not None and "num_iters_completed" in eig:
        result["num_iters"] = eig["num_iters_completed"]
    if "self_influence_tail" in table.column_names:  # distill.tail: both rankings, side by side
        tail = retrieval_metrics(flipped, table.column("self_influence_tail").to_numpy())
        result.update({f"{k}_tail": v for k, v in tail.items() if k != "random_ap"})
        logging.info(
            "with the tail (distill.tail=%s): AUC %.4f, AP %.4f",
            config.distill.tail,
            tail["auc"],
            tail["ap"],
        )
    if jax.process_index() == 0:
        outputs.write_json(path(wd.METRICS_JSON), result)
        _plot_retrieval(path(wd.ROC_PR_PNG), flipped, self_influence, m)
        if eig is not None:
            _plot_spectrum(path(wd.SPECTRUM_PNG), eig)
        board = "evaluate" if result["method"] == "arnoldi" else f"evaluate_{result['method']}"
        writer = ScalarWriter(epath.Path(workdir) / "tensorboard" / board)
        writer.write_scalars(0, {f"evaluate/{k}": v for k, v in m.items()})
        writer.close()
    logging.info(
        "mislabeled retrieval: AUC %.4f, AP %.4f (random AP %.3f)",
        m["auc"],
        m["ap"],
        m["random_ap"],
    )
    return result
