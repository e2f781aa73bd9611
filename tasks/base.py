"""What a task is: a model, its per-example loss, and its data with the corruption applied.

The influence math only sees ``per_example_loss(params, batch) -> (batch_size,)``; the pipeline only
sees ``init_params``, ``per_example_loss``, ``model_inputs`` and the splits as random-access
``tasks.sources.Source``s. A new task (ImageNet, ViT, Paracrawl) is a new module providing
``make_task`` and ``load_splits``; nothing else changes.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Split = dict[str, np.ndarray]
"""Host-memory columns of some examples of a split: at least 'id' (int64, unique across the split),
'label', 'flipped' (bool: the corruption changed this example) and the model inputs."""


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
    """An image classifier with softmax cross-entropy; batches are {'image', 'label', ...}."""

    name: str
    model: nn.Module
    input_shape: tuple[int, ...]

    def init_params(self, key: jax.Array) -> Any:
        dummy = jnp.zeros((1, *self.input_shape), jnp.float32)
        return self.model.init(key, dummy)["params"]

    def logits(self, params: Any, images: jax.Array) -> jax.Array:
        return self.model.apply({"params": params}, images)

    def per_example_loss(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        logits = self.logits(params, batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])

    def model_inputs(self, split: Split) -> dict[str, np.ndarray]:
        """The columns a loss evaluation needs (what gets sharded onto devices)."""
        return {"image": split["image"], "label": split["label"]}
