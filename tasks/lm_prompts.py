"""The language-model task's hooks for ``jobs.explain`` (``tasks/base.py``: ``query_from_text``,
``token_texts``): a prompt becomes a query example the way the planted facts' queries are built
(``tasks/lm.py``: the prompt's tokens, then the answer's, the loss on the answer's tokens only),
the answer being the model's own greedy continuation unless one is given.

A generated continuation stops at the first end-of-sequence token, which stays in it (the model
chose to stop there: that choice is explained too), or at padding, which does not.
"""

import functools
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from tasks.gpt import Gpt, greedy_continue
from tasks.sources import Columns, DataError
from tasks.tokenizer import EOS, PAD, Tokenizer


class Prompts:
    """``query_from_text`` and ``token_texts`` of one model and tokenizer (the greedy decoder is
    compiled once per number of steps)."""

    def __init__(self, model: Gpt, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._greedy = jax.jit(functools.partial(greedy_continue, model), static_argnums=3)

    def query_from_text(self, params: Any, prompt: str, answer: str | None, steps: int) -> Columns:
        """One query example: 'tokens' and 'loss_mask' (1, data.max_len), 'text' (the prompt) and
        'continuation' (the text the loss is on: ``answer``, or the greedy continuation of at
        most ``steps`` tokens). An empty prompt or answer, or one that leaves the model no room
        in its context, is a ``DataError``."""
        max_len = self._tokenizer.max_len
        prompt_ids = self._tokenizer.ids([prompt])[0] if prompt.strip() else []
        if not prompt_ids:
            raise DataError("the prompt is empty; give some text for the model to continue")
        if answer is None:
            if len(prompt_ids) >= max_len:
                raise DataError(
                    f"the prompt is {len(prompt_ids)} tokens; the model's context is "
                    f"data.max_len={max_len}: shorten the prompt to leave room for a continuation"
                )
            continuation = self._continue(params, prompt_ids, steps)
        else:
            continuation = self._tokenizer.ids([answer])[0] if answer.strip() else []
            if not continuation:
                raise DataError(f"the answer to explain for the prompt {prompt!r} is empty")
            total = len(prompt_ids) + len(continuation)
            if total > max_len:
                raise DataError(
                    f"the prompt and its answer are {total} tokens; the model's context is "
                    f"data.max_len={max_len}"
                )
        n, m = len(prompt_ids), len(continuation)
        tokens, mask = np.zeros((1, max_len), np.int32), np.zeros((1, max_len), np.int32)
        tokens[0, :n], tokens[0, n : n + m], mask[0, n : n + m] = prompt_ids, continuation, 1
        if answer is None:  # its pieces as they read, EOS by name; blank ones as ␣
            answer = "".join(self._tokenizer.pieces(continuation)).strip() or "␣" * m
        return {
            "tokens": tokens,
            "loss_mask": mask,
            "text": np.array([prompt], dtype=object),
            "continuation": np.array([answer], dtype=object),
        }

    def _continue(self, params: Any, prompt_ids: list[int], steps: int) -> list[int]:
        """The greedy continuation's ids: at most ``steps`` and the room left in the context,
        through the first EOS, before any padding."""
        max_len, n = self._tokenizer.max_len, len(prompt_ids)
        tokens = np.zeros((1, max_len), np.int32)
        tokens[0, :n] = prompt_ids
        steps = min(steps, max_len - n)
        out = self._greedy(params, tokens, np.array([n], np.int32), steps)
        generated = np.asarray(multihost_utils.process_allgather(out, tiled=True))[0, n : n + steps]
        ids: list[int] = []
        for token in generated.tolist():
            if token == PAD:
                break
            ids.append(token)
            if token == EOS:
                break
        if not ids:
            raise DataError(
                f"the model continued the prompt {self._tokenizer.decode(tokens)[0]!r} "
                "with padding only; give the answer to explain"
            )
        return ids

    def token_texts(self, columns: Columns) -> list[list[str]]:
        """Each example's token texts, up to its last non-padding token."""
        texts = []
        for row in np.asarray(columns["tokens"]):
            real = np.flatnonzero(row != PAD)
            texts.append(self._tokenizer.pieces(row[: real[-1] + 1 if real.size else 0].tolist()))
        return texts
