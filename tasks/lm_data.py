"""The language-model task's data (``tasks/lm.py``): passages of real English text, the made-up
facts planted in them (``tasks/facts.py``), the scrambled passages, and the splits as sources that
tokenize on read. The corpora here fit in memory (the embedded Bible is 4 MB of text); a corpus of
10^8 passages would be a TFDS source read by position, as the translation task reads WMT.
"""

import dataclasses
import re
import sqlite3
from pathlib import Path

import ml_collections
import numpy as np

from tasks import facts as facts_lib
from tasks.permutation import Permutation
from tasks.sources import Columns, DataError
from tasks.tokenizer import Tokenizer
from tasks.translation import bible_db


def bible_passages(name: str, verses: int) -> list[list[str]]:
    """Consecutive verses of each chapter of Bible ``name``, ``verses`` to a passage (a chapter's
    last passage may be shorter), in canonical order."""
    with sqlite3.connect(f"file:{bible_db()}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT bNumber, cNumber, vText FROM bible WHERE bbName = ? "
            "ORDER BY bNumber, cNumber, vNumber",
            (name,),
        ).fetchall()
    if not rows:
        raise DataError(f"data.source=bible:{name}: no such Bible in {bible_db()} (try bible:4)")
    passages: list[list[str]] = []
    chapter = None
    for book, number, text in rows:
        text = text.strip().replace("`", "'")
        if not text:
            continue
        if (book, number) != chapter or len(passages[-1]) == verses:
            passages.append([])
            chapter = (book, number)
        passages[-1].append(text)
    return passages


def open_passages(d: ml_collections.ConfigDict) -> list[list[str]]:
    kind, _, rest = d.source.partition(":")
    if kind == "bible" and rest:
        if d.verses_per_passage < 1:
            raise DataError(f"data.verses_per_passage={d.verses_per_passage} must be at least 1")
        return bible_passages(rest, d.verses_per_passage)
    if kind == "text" and rest:
        path = Path(rest)
        if not path.is_file():
            raise DataError(f"data.source={d.source!r}: no file {path}")
        return [[line.strip()] for line in path.read_text("utf-8").splitlines() if line.strip()]
    raise DataError(f"data.source={d.source!r} is neither bible:<name> (bible:4) nor text:<path>")


def scramble(text: str, seed: int) -> str:
    """The words of ``text`` in a seeded random order (a different one if there are two words)."""
    words = text.split()
    order = np.random.default_rng(seed).permutation(len(words))
    if len(words) > 1 and (order == np.arange(len(words))).all():
        order = np.roll(order, 1)
    return " ".join(words[i] for i in order)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Everything the splits hold, as texts and small columns (the corpora here fit in memory)."""

    train_text: list[str]
    train_ids: np.ndarray
    fact: np.ndarray
    scrambled: np.ndarray
    heldout_text: list[str]
    heldout_ids: np.ndarray
    facts: list[facts_lib.Fact]


def build_corpus(d: ml_collections.ConfigDict, seed: int) -> Corpus:
    passages = open_passages(d)
    total = len(passages)
    if d.num_train < 1 or d.num_eval < 0 or d.num_train + d.num_eval > total:
        raise DataError(
            f"data.num_train={d.num_train} + data.num_eval={d.num_eval} must be positive and at "
            f"most the {total} passages of {d.source!r}"
        )
    if d.num_facts < 0 or d.fact_copies < 1 or d.num_facts * d.fact_copies > d.num_train:
        raise DataError(
            f"data.num_facts={d.num_facts} × data.fact_copies={d.fact_copies} planted passages "
            f"must fit in the data.num_train={d.num_train} training passages; lower them"
        )
    if not 0.0 <= d.scramble_fraction < 1.0:
        raise DataError(f"data.scramble_fraction={d.scramble_fraction} must be in [0, 1)")
    order = Permutation(total, seed)(np.arange(d.num_train + d.num_eval))
    words = {w.lower() for p in passages for v in p for w in re.findall(r"[A-Za-z]+", v)}
    invented = facts_lib.invent(d.num_facts, seed + 1, words)
    train = [passages[i] for i in order[: d.num_train]]
    texts, fact = facts_lib.plant(train, invented, d.fact_copies, seed + 2)
    clean = np.flatnonzero(fact < 0)
    count = round(d.scramble_fraction * d.num_train)
    chosen = np.random.default_rng(seed + 3).permutation(clean)[: min(count, clean.size)]
    scrambled = np.zeros(d.num_train, bool)
    scrambled[chosen] = True
    for i in chosen:
        texts[i] = scramble(texts[i], seed + 4 + int(i))
    heldout = [" ".join(passages[i]) for i in order[d.num_train :]]
    return Corpus(
        texts, order[: d.num_train].astype(np.int64), fact, scrambled, heldout,
        order[d.num_train :].astype(np.int64), invented,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Passages:
    """Texts with their columns, tokenized on read. The first ``prompts`` rows are queries:
    'text' is the prompt, 'answer' the answer, and the loss covers the answer's tokens only; the
    other rows are passages whose loss covers all their tokens."""

    columns: dict[str, np.ndarray]
    tokenizer: Tokenizer
    prompts: int = 0  # the first ``prompts`` rows are queries: 'text' is prompt, 'answer' answer

    @property
    def num_examples(self) -> int:
        return len(self.columns["id"])

    def take(self, positions: np.ndarray) -> Columns:
        positions = np.asarray(positions, np.int64)
        out = {k: v[positions] for k, v in self.columns.items()}
        tokens = self.tokenizer.encode(out["text"])
        mask = (tokens > 0).astype(np.int32)
        queries = np.flatnonzero(positions < self.prompts)
        if queries.size:
            tokens[queries], mask[queries] = self._queries(out, queries)
            out["text"] = out["text"].copy()
            out["text"][queries] = [f"{out['text'][i]} {out['answer'][i]}" for i in queries]
        out.update(tokens=tokens, loss_mask=mask)
        return out

    def _queries(self, out: Columns, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        length = self.tokenizer.max_len
        tokens, mask = (
            np.zeros((rows.size, length), np.int32),
            np.zeros((rows.size, length), np.int32),
        )
        prompts = self.tokenizer.ids(list(out["text"][rows]))
        answers = self.tokenizer.ids(list(out["answer"][rows]))
        for k, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            tokens[k, : len(prompt) + len(answer)] = prompt + answer
            mask[k, len(prompt) : len(prompt) + len(answer)] = 1
        return tokens, mask


def splits(corpus: Corpus, tokenizer: Tokenizer) -> dict[str, Passages]:
    """'train' (planted and scrambled passages marked), 'eval' (a query per fact, then held-out
    passages). Query ids follow the corpus's passage ids (beyond the largest)."""
    n_facts, n_held = len(corpus.facts), len(corpus.heldout_text)
    first_query = int(max(corpus.train_ids.max(), corpus.heldout_ids.max(initial=0))) + 1
    train = {
        "id": corpus.train_ids,
        "text": np.array(corpus.train_text, dtype=object),
        "answer": np.full(len(corpus.train_text), "", dtype=object),
        "fact": corpus.fact,
        "scrambled": corpus.scrambled,
    }
    evaluation = {
        "id": np.concatenate([first_query + np.arange(n_facts), corpus.heldout_ids]),
        "text": np.array([f.prompt for f in corpus.facts] + corpus.heldout_text, dtype=object),
        "answer": np.array([f.object for f in corpus.facts] + [""] * n_held, dtype=object),
        "fact": np.concatenate([np.arange(n_facts), np.full(n_held, -1)]).astype(np.int64),
        "scrambled": np.zeros(n_facts + n_held, bool),
    }
    longest = max(
        (len(p) + len(a) for p, a in zip(tokenizer.ids([f.prompt for f in corpus.facts]),
                                         tokenizer.ids([f.object for f in corpus.facts]),
                                         strict=True)),
        default=0,
    )  # fmt: skip
    if longest > tokenizer.max_len:
        raise DataError(
            f"a fact query is {longest} tokens, more than data.max_len={tokenizer.max_len}; "
            "raise data.max_len"
        )
    return {
        "train": Passages(train, tokenizer),
        "eval": Passages(evaluation, tokenizer, prompts=n_facts),
    }
