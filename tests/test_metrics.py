"""Retrieval metrics (influence/metrics.py) against scikit-learn, ties included."""

from collections.abc import Callable

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from influence import metrics

Metric = Callable[[np.ndarray, np.ndarray], float]


def random_problem(seed: int, size: int, decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded labels (~20% positives, at least one of each) and scores weakly correlated with them;
    ``decimals`` rounds the scores to create many tied thresholds (None: continuous, no ties)."""
    rng = np.random.default_rng(seed)
    labels = rng.random(size) < 0.2
    labels[:2] = [True, False]
    scores = rng.normal(size=size) + 0.8 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    return labels, scores


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 1, 0], ids=["no-ties", "ties", "many-ties"])
def test_auc_and_ap_match_sklearn(seed: int, decimals: int | None) -> None:
    """roc_auc and average_precision equal scikit-learn's to 1e-12, with tied scores sharing one
    threshold (rounding to 0 decimals leaves ~10 distinct values for 500 examples)."""
    labels, scores = random_problem(seed, 500, decimals)
    if decimals is not None:
        assert np.unique(scores).size < scores.size  # the ties are really there
    auc = metrics.roc_auc(labels, scores)
    ap = metrics.average_precision(labels, scores)
    assert isinstance(auc, float) and isinstance(ap, float)
    assert abs(auc - roc_auc_score(labels, scores)) <= 1e-12
    assert abs(ap - average_precision_score(labels, scores)) <= 1e-12


def test_integer_labels_and_constant_scores() -> None:
    """0/1 integer labels work like booleans; all-tied scores give AUC ½ and AP = positive rate,
    as in scikit-learn."""
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 0])
    scores = np.full(labels.size, 0.3)
    assert metrics.roc_auc(labels, scores) == pytest.approx(0.5, abs=1e-12)
    assert metrics.average_precision(labels, scores) == pytest.approx(0.25, abs=1e-12)
    assert metrics.average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )


def test_perfect_and_reversed_rankings() -> None:
    """Positives ranked first: AUC = AP = 1; ranked last: AUC = 0 and AP = sklearn's value."""
    labels = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    scores = np.arange(labels.size, 0, -1).astype(float)
    assert metrics.roc_auc(labels, scores) == 1.0
    assert metrics.average_precision(labels, scores) == 1.0
    assert metrics.roc_auc(labels, -scores) == 0.0
    assert metrics.average_precision(labels, -scores) == pytest.approx(
        average_precision_score(labels, -scores), abs=1e-12
    )


def test_curves_endpoints() -> None:
    """ROC and PR curves start at (0, 0) / precision 1 and end at (1, 1) / recall 1."""
    labels, scores = random_problem(0, 100, 1)
    c = metrics.curves(labels, scores)
    assert (c.fpr[0], c.tpr[0], c.precision[0]) == (0.0, 0.0, 1.0)
    assert (c.fpr[-1], c.tpr[-1], c.recall[-1]) == (1.0, 1.0, 1.0)
    assert np.all(np.diff(c.fpr) >= 0) and np.all(np.diff(c.tpr) >= 0)


@pytest.mark.parametrize("metric", [metrics.roc_auc, metrics.average_precision])
@pytest.mark.parametrize(
    "labels", [np.ones(5, bool), np.zeros(5, bool)], ids=["all-positive", "all-negative"]
)
def test_single_class_is_an_error(metric: Metric, labels: np.ndarray) -> None:
    """With only one class neither metric is defined: ValueError, not a NaN."""
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        metric(labels, np.linspace(0.0, 1.0, labels.size))


@pytest.mark.parametrize("metric", [metrics.roc_auc, metrics.average_precision])
def test_shape_mismatch_is_an_error(metric: Metric) -> None:
    """Labels and scores of different lengths are rejected."""
    with pytest.raises(ValueError, match="must be equal 1-D shapes"):
        metric(np.array([True, False, True]), np.array([0.1, 0.2]))
