"""SentencePiece tokens for the text tasks (translation, the language model): a unigram model
trained on the training text the way flax examples/wmt/tokenizer.py does (full character coverage),
on process 0, kept in the workdir with a fingerprint of what it was trained from and checked on
every later run. Ids: 0 = padding, 1 = end of sequence, 2 = unknown.
"""

import io
import json
import threading
from collections.abc import Callable, Iterator

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from checkpoints import fingerprint
from tasks.sources import DataError

PAD, EOS, UNK = 0, 1, 2


class Tokenizer:
    """SentencePiece with this task's ids (0 pad, 1 EOS, 2 unknown); ``encode`` pads/truncates."""

    def __init__(self, model_proto: bytes, max_len: int):
        import sentencepiece as spm

        self.proto, self.max_len = model_proto, max_len
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.truncated = self.seen = 0
        self._count = threading.Lock()  # encode runs in the prefetch threads

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's piece ids, without EOS or padding."""
        return self._sp.encode([str(t) for t in texts])

    def encode(self, texts: np.ndarray) -> np.ndarray:
        """(len(texts), max_len) int32 ids, each sentence followed by EOS, 0-padded; longer ones
        are cut to max_len (EOS kept last) and counted."""
        out = np.zeros((len(texts), self.max_len), np.int32)
        cut = 0
        for i, ids in enumerate(self.ids(list(texts))):
            ids = [*ids, EOS]
            if len(ids) > self.max_len:
                ids = [*ids[: self.max_len - 1], EOS]
                cut += 1
            out[i, : len(ids)] = ids
        with self._count:
            self.truncated += cut
            self.seen += len(texts)
            truncated, seen = self.truncated, self.seen
        if truncated:
            logging.log_every_n_seconds(
                logging.WARNING,
                "%d of %d sequences read so far were longer than data.max_len=%d tokens and "
                "truncated",
                60,
                truncated,
                seen,
                self.max_len,
            )
        return out

    def pieces(self, ids: list[int]) -> list[str]:
        """Each id's text as it reads in the decoded string: SentencePiece's word-start mark
        (U+2581) as a space, EOS as its piece name."""
        return [self._sp.id_to_piece(int(i)).replace("\u2581", " ") for i in ids]

    def decode(self, ids: np.ndarray) -> list[str]:
        """Token ids back to text, up to the first EOS."""
        rows = []
        for row in np.asarray(ids):
            row = [int(t) for t in row]
            row = row[: row.index(EOS)] if EOS in row else row
            rows.append(self._sp.decode([t for t in row if t != PAD]))
        return rows


def train_tokenizer(sentences: Iterator[str], vocab_size: int) -> bytes:
    """A unigram SentencePiece model over ``sentences`` (flax examples/wmt/tokenizer.py settings:
    full character coverage), in memory, single-threaded so it is reproducible."""
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=model,
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            pad_id=PAD,
            eos_id=EOS,
            unk_id=UNK,
            bos_id=-1,
            num_threads=1,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(
            f"the tokenizer cannot be trained on this text ({e}); lower data.vocab_size"
        ) from e
    return model.getvalue()


def tokenizer_for(
    directory: epath.Path,
    expected: dict,
    texts: Callable[[], Iterator[str]],
    vocab_size: int,
    max_len: int,
) -> Tokenizer:
    """The tokenizer in ``directory`` if it was trained from the data ``expected`` describes (a
    fingerprint of the config fields the training text depends on), else one trained now on
    ``texts()`` by process 0 and saved (the other processes wait, then read it)."""
    directory = epath.Path(directory)
    model_path, meta_path = directory / "spm.model", directory / "meta.json"
    if not model_path.exists() and jax.process_index() == 0:
        logging.info("training a %d-piece tokenizer on the training text", vocab_size)
        proto = train_tokenizer(texts(), vocab_size)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "meta.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": expected}))
        (directory / "spm.model.tmp").write_bytes(proto)
        tmp.rename(meta_path)
        (directory / "spm.model.tmp").rename(model_path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tokenizer ready")
    saved = json.loads(meta_path.read_text())["fingerprint"]
    fingerprint.check(
        saved,
        expected,
        f"the tokenizer in {directory}",
        "use a new --workdir, or restore the config it was trained with",
    )
    return Tokenizer(model_path.read_bytes(), max_len)
