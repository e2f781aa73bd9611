"""The task contract: what the pipeline needs from a model and its data, and nothing more.

A task is a module named by ``config.task``, an import path (``tasks.translation``,
``my_package.my_task``; built-in short names are aliases, ``tasks/registry.py``). It provides

    get_task(config: ml_collections.ConfigDict, workdir: epath.Path) -> Task

reading its own config fields (``config.model``, ``config.data`` and any block of its own; every
field outside the stage blocks is part of the training fingerprint, ``stages/workdir.py``).
``workdir`` is where a task keeps what it derives from its data, e.g. a tokenizer trained on the
training text. The influence math only sees ``per_example_loss(params, batch) -> (batch_size,)``
over any batch structure (images, token ids with padding masks, ...); the pipeline only sees the
``Task`` below and the splits as random-access ``tasks.sources.Source``s.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tasks.sources import Columns, Source

Split = dict[str, np.ndarray]
"""Host-memory columns of some examples of a split: at least 'id' (int64, unique across the split)
and the model inputs."""

Metrics = Callable[[Any, Mapping[str, jax.Array]], dict[str, jax.Array]]
CorpusMetrics = Callable[[Any, Source], dict[str, float]]
TrainLoss = Callable[[Any, Mapping[str, jax.Array]], tuple[jax.Array, Any]]
Augment = Callable[[Columns, np.ndarray], Columns]
PerTokenLoss = Callable[[Any, Mapping[str, jax.Array]], jax.Array]
QueryFromText = Callable[[Any, str, str | None, int], Columns]
TokenTexts = Callable[[Columns], list[list[str]]]


@dataclasses.dataclass(frozen=True)
class Task:
    """A model, its per-example loss and its data, as the pipeline sees them.

    Attributes:
      name: for logs and outputs.
      init_params: key → params (a pytree; nested dicts, as Flax makes them, name the leaves).
      per_example_loss: (params, batch) → (batch_size,) losses; ``batch`` holds the
        ``input_columns`` as arrays with the example axis first. No regularisation (config.l2).
      splits: 'train' and 'eval' sources; every example has a stable int64 'id' column.
      input_columns: the columns the loss reads (what is sharded onto the devices).
      record_columns: host columns written beside 'id' in the score outputs (e.g. the label).
      corruption_column: a bool column marking the examples the task corrupted (the ground truth
        of mislabeled / shuffled retrieval), or None when there is none.
      ground_truth_columns: columns recorded for each corrupted training example
        (``corrupted.parquet``), e.g. the clean and the noisy label.
      relevance_column: an int column of both splits naming what a traced query is about: a
        training example is relevant to an eval example when their values are equal and ≥ 0
        (the LM task's planted facts: the passages that state the fact its query asks for).
        The evaluate stage then measures how well the influence ranking of each traced query
        retrieves its relevant examples (recall@10, MRR, AUC); None: no such ground truth.
      metrics: (params, batch) → per-example values (e.g. {'accuracy': 0/1}) averaged over a split
        after training, over the examples where a value is finite (NaN: it does not apply to
        that example); None: the mean loss only.
      corpus_metrics: (params, source) → quality measures of trained params over a whole split
        that are not means of per-example values (BLEU of greedy translations); computed on one
        host, by the data-filtering comparison (``benchmarks/filtering.py``), not by the stages.
      param_include, param_exclude: the default parameter selection (regexes over leaf paths,
        ``influence/selection.py``) when the config gives none.
      fingerprint: what else the trained params depend on (e.g. a tokenizer's digest).
      state: a regex (``re.fullmatch`` over leaf paths) of the leaves that are model state, not
        parameters: BatchNorm statistics (``batch_stats/.*``). The optimizer never updates them
        and influence never covers them (they are constants of the Hessian, as in the paper);
        ``train_loss`` updates them.
      train_loss: (params, batch) → (per-example losses in training mode, the new state leaves as
        a nested dict shaped like the state subtree). Required with ``state``; without it the train
        job uses ``per_example_loss``.
      trainable: a regex of the leaves the optimizer updates (empty: every leaf but the state);
        the others stay at their initial values (a frozen pretrained body under adapters). The
        L2 term of training covers the trainable leaves only.
      augment: (columns, seeds) → columns: a train-time augmentation of host columns, example i
        randomised by ``seeds[i]`` (drawn from the seed, the step and the example's position);
        the train job only, never influence or evaluation.
      param_rank: leaf path → a sortable rank in the forward pass (stem < blocks < head), for
        ``params.last_fraction`` ("the last blocks"); None: the task offers no such order.
      describe: (params, host columns of some examples) → what a person looks at before they
        believe a score (the report's galleries, ``stages/gallery.py``): 'caption' (one string
        per example: the given label, the prediction ...) and 'image' ((n, H, W) or (n, H, W, C)
        arrays) or 'text' (strings); None: the report shows ids and scores only.
      per_token_loss: (params, batch) → (batch_size, length) losses whose rows sum to
        ``per_example_loss``: each column a token's share of the example's loss (0 where a
        token carries none). Influence splits over them exactly (``influence/tokens.py``);
        None: the task's loss has no tokens.
      query_from_text: (params, prompt, answer or None, steps) → the columns of ONE example
        whose loss ``jobs.explain`` explains: the model inputs and 'continuation' (the text the
        loss is on: the given ``answer``, or the model's greedy continuation of ``prompt`` of at
        most ``steps`` tokens). A prompt the task cannot use (empty, too long) is a
        ``DataError`` of one line; None: the task cannot be explained from text.
      token_texts: (host columns of some examples) → for each, the text of its tokens in order,
        one string per column of ``per_token_loss`` up to its last real token (what the
        explanations print beside each token's score).
    """

    name: str
    init_params: Callable[[jax.Array], Any]
    per_example_loss: Callable[[Any, Mapping[str, jax.Array]], jax.Array]
    splits: Mapping[str, Source]
    input_columns: tuple[str, ...]
    record_columns: tuple[str, ...] = ()
    corruption_column: str | None = None
    ground_truth_columns: tuple[str, ...] = ()
    relevance_column: str | None = None
    metrics: Metrics | None = None
    corpus_metrics: CorpusMetrics | None = None
    param_include: str = ""
    param_exclude: str = ""
    fingerprint: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    state: str = ""
    train_loss: TrainLoss | None = None
    trainable: str = ""
    augment: Augment | None = None
    param_rank: Callable[[str], Any] | None = None
    describe: Callable[[Any, Columns], dict[str, Any]] | None = None
    per_token_loss: PerTokenLoss | None = None
    query_from_text: QueryFromText | None = None
    token_texts: TokenTexts | None = None

    def model_inputs(self, columns: Columns) -> dict[str, np.ndarray]:
        """The columns a loss evaluation needs (what gets sharded onto devices)."""
        return {k: columns[k] for k in self.input_columns}

    def output_columns(self) -> tuple[str, ...]:
        """The host columns each score output row carries: id, records, the corruption flag."""
        extra = (self.corruption_column,) if self.corruption_column else ()
        return ("id", *self.record_columns, *extra)


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

    def per_example_loss(self, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        logits = self.logits(params, batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])

    def accuracy(self, params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        predicted = jnp.argmax(self.logits(params, batch["image"]), axis=-1)
        return {"accuracy": (predicted == batch["label"]).astype(jnp.float32)}

    def model_inputs(self, split: Split) -> dict[str, np.ndarray]:
        return {"image": split["image"], "label": split["label"]}

    def describe(self, params: Any, columns: Columns) -> dict[str, Any]:
        """The images, captioned with the label trained on, the prediction, and the clean label
        where the task corrupted it."""
        predicted = np.asarray(jnp.argmax(self.logits(params, columns["image"]), axis=-1))
        captions = []
        for i, label in enumerate(columns["label"]):
            text = f"given {int(label)}, pred {int(predicted[i])}"
            if "clean_label" in columns and columns["clean_label"][i] != label:
                text += f" (clean {int(columns['clean_label'][i])})"
            captions.append(text)
        return {"image": np.asarray(columns["image"]), "caption": captions}

    def as_task(self, splits: Mapping[str, Source], **fields: Any) -> Task:
        """The pipeline's view: this classifier on ``splits`` (labels may carry a corruption)."""
        return Task(
            name=self.name,
            init_params=self.init_params,
            per_example_loss=self.per_example_loss,
            splits=splits,
            input_columns=("image", "label"),
            metrics=self.accuracy,
            describe=self.describe,
            **fields,
        )
