"""Retrieval metrics for mislabeled-example detection (Schioppa et al. 2022, §5.1).

Examples are ranked by self-influence; the flipped ones are the positives. AUC is the ROC area,
AP the average precision (area under the precision–recall curve, step-wise), both computed exactly
with ties broken as scikit-learn does (a tie shares one threshold).
"""

from typing import NamedTuple

import numpy as np


class Curves(NamedTuple):
    fpr: np.ndarray
    tpr: np.ndarray
    precision: np.ndarray
    recall: np.ndarray


def _cumulative_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(
            f"labels {labels.shape} and scores {scores.shape} must be equal 1-D shapes"
        )
    if labels.all() or not labels.any():
        raise ValueError("need at least one positive and one negative example")
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.nonzero(np.diff(scores))[0], labels.size - 1]
    tps = np.cumsum(labels)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64)


def curves(labels: np.ndarray, scores: np.ndarray) -> Curves:
    tps, fps = _cumulative_counts(labels, scores)
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    precision = np.r_[1.0, tps / (tps + fps)]
    return Curves(fpr=fpr, tpr=tpr, precision=precision, recall=tpr)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    c = curves(labels, scores)
    return float(np.trapezoid(c.tpr, c.fpr))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Σ_k (R_k − R_{k−1}) P_k over thresholds, as in scikit-learn."""
    c = curves(labels, scores)
    return float(np.sum(np.diff(c.recall) * c.precision[1:]))


def ranked_retrieval(
    relevant: np.ndarray, above: np.ndarray, ties: np.ndarray, negatives: int, k: int = 10
) -> dict[str, float]:
    """How well one query's ranking of the training examples finds its relevant ones (fact
    tracing: the passages that state the fact; Chang et al. 2024), from counts a stream over the
    examples can gather: ``relevant`` the relevant examples' scores, ``above`` / ``ties`` how many
    of the ``negatives`` other examples score strictly above / equal to each.

    Ties are broken at random, in expectation: recall@k is the expected fraction of the relevant
    examples among the top k (at most k / their number); MRR is 1 / the expected rank of the first
    relevant one; AUC the chance that a relevant example outranks another one (ties count ½),
    equal to ``roc_auc`` over all examples.
    """
    relevant = np.asarray(relevant, np.float64)
    if relevant.size == 0:
        raise ValueError("a query without relevant examples has no retrieval metrics")
    above, ties = np.asarray(above, np.float64), np.asarray(ties, np.float64)
    pairs = relevant[None, :] - relevant[:, None]  # [i, j]: how far j scores above i
    over = above + (pairs > 0).sum(axis=1)  # every example strictly above each relevant one
    level = ties + (pairs == 0).sum(axis=1) - 1  # every other example tied with it
    # Its rank is uniform over over + 1 … over + 1 + level: the chance that it is in the top k.
    in_top = np.clip((k - over) / (level + 1), 0.0, 1.0)
    best = int(np.argmax(relevant))  # the first relevant one: r relevant, n others at its score
    r = int((pairs[best] == 0).sum())
    first = over[best] + (r + ties[best] + 1) / (r + 1)
    auc = (negatives - above - 0.5 * ties) / max(negatives, 1)
    return {
        f"recall_at_{k}": float(np.sum(in_top) / relevant.size),
        "mrr": float(1.0 / first),
        "auc": float(np.mean(auc)),
    }
