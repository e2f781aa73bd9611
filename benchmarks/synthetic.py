"""A synthetic task of any size for the streaming benchmark: example i's features are a hash of
(seed, i), so a source of 10^7 examples holds nothing per example (``tasks/permutation.uniform``).

A tiny MLP classifier (dim → 16 → 2) on label = [sum of features > dim / 2]. Sizes come from
``config.data.num_train`` / ``num_eval``; ``config.data.dim`` is the feature width.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from tasks.base import Task
from tasks.permutation import uniform
from tasks.sources import Columns


class HashedSource:
    """Examples [offset, offset + n) of an endless hashed dataset, read by position."""

    def __init__(self, n: int, offset: int, dim: int, seed: int):
        self._n, self._offset, self._dim, self._seed = n, offset, dim, seed

    @property
    def num_examples(self) -> int:
        return self._n

    def take(self, positions: np.ndarray) -> Columns:
        ids = self._offset + np.asarray(positions, np.int64)
        x = uniform(self._seed, ids[:, None] * self._dim + np.arange(self._dim)).astype(np.float32)
        return {"id": ids, "x": x, "label": (x.sum(1) > self._dim / 2).astype(np.int32)}


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(2)(nn.tanh(nn.Dense(16)(x)))


def get_task(config: ml_collections.ConfigDict, workdir: epath.Path) -> Task:
    del workdir
    d, model = config.data, MLP()

    def per_example_loss(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])

    return Task(
        name="synthetic",
        init_params=lambda key: model.init(key, jnp.zeros((1, d.dim)))["params"],
        per_example_loss=per_example_loss,
        splits={
            "train": HashedSource(d.num_train, 0, d.dim, config.seed),
            "eval": HashedSource(d.num_eval, d.num_train, d.dim, config.seed),
        },
        input_columns=("x", "label"),
        record_columns=("label",),
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``--config=benchmarks/synthetic.py:<num_train>``."""
    from configs import common

    config = common.base_config()
    config.task = "benchmarks.synthetic"
    n = int(arg or 100_000)
    config.data = ml_collections.ConfigDict({"num_train": n, "num_eval": 0, "dim": 16})
    config.train.num_epochs = 1
    config.train.batch_size = min(8192, n)
    config.arnoldi.num_iters = 8
    config.arnoldi.hvp_batch_size = min(4096, n)
    config.distill.top_k = 4
    config.score.batch_size = 8192
    config.score.examples_per_shard = 2**17
    config.score.num_queries = 0
    config.log_every_secs = 1000.0
    return config
