"""Bring your own model: a Flax MLP of your own on scikit-learn's 8×8 digits, 10% of the training
labels flipped, through the framework's jobs unchanged (README "Bring your own model").

The whole contract is ``get_task(config, workdir) -> tasks.base.Task``: params init, a per-example
loss over any batch dict, the splits as random-access sources with an int64 'id' column, and
(optionally) which columns to record, which bool column marks the corrupted examples, and a metric.
Run it with ``python -m jobs.pipeline --config=examples/digits_config.py --workdir=workdirs/digits``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from sklearn.datasets import load_digits

from tasks.base import Task
from tasks.sources import ArraySource


class MLP(nn.Module):
    hidden: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.tanh(nn.Dense(self.hidden, name="hidden")(x))
        return nn.Dense(10, name="out")(x)  # parameter paths: hidden/kernel, out/bias, ...


def get_task(config: ml_collections.ConfigDict, workdir: epath.Path) -> Task:
    model = MLP(hidden=config.data.hidden)
    images, labels = load_digits(return_X_y=True)  # 1,797 real 8×8 digits, shipped with sklearn
    rng = np.random.default_rng(config.seed)
    order, n = rng.permutation(len(labels)), config.data.num_train
    flipped = np.zeros(len(labels), bool)
    flipped[order[:n]] = rng.random(n) < config.data.flip_fraction  # corrupt training labels only
    noisy = np.where(flipped, (labels + rng.integers(1, 10, len(labels))) % 10, labels)
    columns = {
        "id": np.arange(len(labels), dtype=np.int64),
        "x": (images / 16.0).astype(np.float32),
        "label": noisy.astype(np.int32),
        "clean_label": labels.astype(np.int32),
        "flipped": flipped,
    }

    def per_example_loss(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])

    def accuracy(params, batch):
        predicted = model.apply({"params": params}, batch["x"]).argmax(-1)
        return {"accuracy": (predicted == batch["label"]).astype(jnp.float32)}

    return Task(
        name="digits",
        init_params=lambda key: model.init(key, jnp.zeros((1, 64)))["params"],
        per_example_loss=per_example_loss,
        splits={
            "train": ArraySource({k: v[order[:n]] for k, v in columns.items()}),
            "eval": ArraySource({k: v[order[n:]] for k, v in columns.items()}),
        },
        input_columns=("x", "label"),
        record_columns=("label",),
        corruption_column="flipped",
        ground_truth_columns=("clean_label", "label"),
        metrics=accuracy,
    )
