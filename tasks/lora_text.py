"""Sentiment with a LoRA-tuned pretrained transformer: Rotten Tomatoes snippets, fresh vs rotten,
a seeded ``data.flip_fraction`` of the training labels flipped (HyperINF and DataInf's mislabeled
data detection, Zhou et al. 2024 §5.1, Kwon et al. 2023 §4.2, on a model that runs offline).

The model is MiniLM-L6 (``tasks/bert.py``, its first ``model.num_layers`` pretrained layers),
frozen, with LoRA adapters (``tasks/lora.py``) on the Dense layers whose path matches
``lora.targets`` (default: every layer's query and value, as HyperINF), rank ``lora.rank``, scale
α/r or α/√r (``lora.rslora``), and a linear head on the mean-pooled last hidden states. Params:

    {"encoder": MiniLM's weights (frozen), "lora": {layer_i: {attention: {query: {a, b}, ...}}},
     "head": {"kernel": (hidden, 2), "bias": (2,)}}

The optimizer trains the adapters and the head (``Task.trainable``); influence covers the adapters
only (``Task.param_include``, the papers' choice: their GFIM is per adapted matrix), overridable
with ``config.params.include`` (``'(lora|head)/.*'`` adds the head).

The texts are tokenized once when the task is built (MiniLM's WordPiece, ``[CLS] … [SEP]`` cut
to ``data.max_len`` tokens and padded); splits are a seeded permutation of the 12,808 snippets.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from tasks import bert, lora, rotten_tomatoes
from tasks.base import Task
from tasks.mnist import noisy_label_splits
from tasks.sources import ArraySource, Columns, DataError

NUM_CLASSES = 2
NAMES = ("rotten", "fresh")  # by label


@functools.cache
def _pretrained(num_layers: int) -> tuple[bert.BertConfig, dict[str, Any]]:
    """MiniLM's first ``num_layers`` layers, read once per process (a stage set-up, the train
    job's init and the report all ask for them)."""
    return bert.load_minilm(num_layers)


def _corpus(max_len: int) -> ArraySource:
    """Every snippet: 'text', its tokens ('input_ids', 'attention_mask'), 'label' (1 fresh, 0
    rotten)."""
    texts, labels = rotten_tomatoes.load_snippets()
    ids, mask = bert.tokenize(bert.load_tokenizer(), texts, max_len)
    return ArraySource(
        {"text": np.asarray(texts), "input_ids": ids, "attention_mask": mask, "label": labels}
    )


def splits(d: ml_collections.ConfigDict, seed: int) -> tuple[Any, Any]:
    """(train, eval): disjoint ranges of a seeded permutation; ``d.flip_fraction`` of the
    training labels flipped (``tasks.mnist.noisy_label_splits`` with 2 classes)."""
    corpus = _corpus(d.max_len)
    total = corpus.num_examples
    if d.num_train < 1 or d.num_eval < 1 or d.num_train + d.num_eval > total:
        raise DataError(
            f"data.num_train={d.num_train} + data.num_eval={d.num_eval} must be positive and at "
            f"most the {total} Rotten Tomatoes snippets"
        )
    order = np.random.default_rng(seed).permutation(total)
    train_rows, eval_rows = order[: d.num_train], order[d.num_train : d.num_train + d.num_eval]
    return noisy_label_splits(
        corpus, train_rows, corpus, eval_rows, d.flip_fraction, seed + 1, NUM_CLASSES
    )


class Classifier:
    """MiniLM + LoRA + a linear head (module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        m, r = config.encoder, config.lora
        self.encoder_config, _ = _pretrained(m.num_layers)
        self.encoder = bert.BertEncoder(self.encoder_config)
        self.scale = lora.scaling(r.alpha, r.rank, r.rslora)
        self._targets, self._rank, self._num_layers = r.targets, r.rank, m.num_layers

    def init_params(self, key: jax.Array) -> dict[str, Any]:
        _, encoder = _pretrained(self._num_layers)
        lora_key, head_key = jax.random.split(key)
        hidden = self.encoder_config.hidden_size
        head = jax.nn.initializers.lecun_normal()(head_key, (hidden, NUM_CLASSES), jnp.float32)
        return {
            "encoder": jax.tree.map(jnp.asarray, encoder),
            "lora": lora.init_adapters(encoder, self._targets, self._rank, lora_key),
            "head": {"kernel": head, "bias": jnp.zeros((NUM_CLASSES,), jnp.float32)},
        }

    def logits(self, params: dict[str, Any], batch: dict[str, jax.Array]) -> jax.Array:
        with lora.attached(params["lora"], self.scale):
            hidden = self.encoder.apply(
                {"params": params["encoder"]}, batch["input_ids"], batch["attention_mask"]
            )
        pooled = bert.mean_pool(hidden, batch["attention_mask"])
        return pooled @ params["head"]["kernel"] + params["head"]["bias"]

    def per_example_loss(self, params: dict[str, Any], batch: dict[str, jax.Array]) -> jax.Array:
        logits = self.logits(params, batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])

    def accuracy(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        predicted = jnp.argmax(self.logits(params, batch), axis=-1)
        return {"accuracy": (predicted == batch["label"]).astype(jnp.float32)}

    def describe(self, params: Any, columns: Columns) -> dict[str, list[str]]:
        """The snippet as text, captioned with the label trained on, the prediction and, for a
        flipped one, the true label."""
        batch = {k: jnp.asarray(columns[k]) for k in ("input_ids", "attention_mask")}
        predicted = np.asarray(jnp.argmax(self.logits(params, batch), axis=-1))
        captions = []
        for i, label in enumerate(columns["label"]):
            caption = f"given {NAMES[label]}, pred {NAMES[predicted[i]]}"
            if columns["clean_label"][i] != label:
                caption += f" (true {NAMES[columns['clean_label'][i]]})"
            captions.append(caption)
        return {"text": [str(t) for t in columns["text"]], "caption": captions}


def get_task(config: ml_collections.ConfigDict, workdir: epath.Path) -> Task:
    """The task contract (``tasks/base.py``); nothing is kept in the workdir."""
    del workdir
    classifier = Classifier(config)  # a bad model or LoRA field fails before the data is read
    jax.eval_shape(classifier.init_params, jax.random.key(0))  # LoRA targets and rank checked
    train, evaluation = splits(config.data, config.seed)
    return Task(
        name="lora_text",
        init_params=classifier.init_params,
        per_example_loss=classifier.per_example_loss,
        splits={"train": train, "eval": evaluation},
        input_columns=("input_ids", "attention_mask", "label"),
        record_columns=("label",),
        corruption_column="flipped",
        ground_truth_columns=("clean_label", "label", "text"),
        metrics=classifier.accuracy,
        param_include="lora/.*",
        trainable="(lora|head)/.*",
        describe=classifier.describe,
    )
