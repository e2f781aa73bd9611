"""What ``jobs.explain`` writes (``stages/explain.py``), by process 0, into ``<results>/explain/``:

- ``explanations.parquet``: one row per (prompt, kind, rank): prompt_index, prompt,
  continuation, kind (proponent / opponent), rank (0 first), train_id, influence;
- ``tokens.parquet``: one row per token of each training passage in those rows (once per prompt):
  prompt_index, train_id, position, token (its text), score (its share ⟨∇ℓ_t(x), P∇L(z)⟩ of the
  influence: a passage's scores sum to its influence);
- ``explain.md``: each prompt and its continuation, then its proponents and opponents as text with
  their strongest tokens in bold (the top ``MARKED`` by |score|), marked ⁺ (adds to the
  influence) or ⁻ (takes from it); the same text is printed to stdout.
"""

import math
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np
import pyarrow as pa

from methods.base import Context
from runtime import outputs, workdir
from scoring.explanations import Ranked
from tasks.sources import Columns

if TYPE_CHECKING:
    from stages.explain import Request

EXPLANATIONS_FILE = "explanations.parquet"
TOKENS_FILE = "tokens.parquet"
MARKDOWN_FILE = "explain.md"
MARKED = 0.1  # the fraction of a passage's tokens shown in bold (at least one)
_SPECIAL = re.compile(r"([\\`*_<>\[\]#|])")


def write(
    ctx: Context,
    params: Any,
    ranked: dict[str, Ranked],
    request: "Request",
    examples: list[Columns],
) -> None:
    """The three files (module docstring) and the summary on stdout, by process 0; every process
    reads the top passages (a task's ``describe`` may run the model on them)."""
    positions = np.unique(np.concatenate([r.positions.ravel() for r in ranked.values()]))
    positions = positions[positions >= 0]
    columns = ctx.split("train").take(positions)
    passages = _Passages(
        positions,
        columns["id"],
        ctx.task.token_texts(columns),
        _captions(ctx, params, columns, len(positions)),
    )
    continuations = [str(e["continuation"][0]) for e in examples]
    if jax.process_index() != 0:
        return
    out = ctx.results / workdir.EXPLAIN
    outputs.write_parquet(
        out / EXPLANATIONS_FILE, _explanations(ranked, request, continuations, passages)
    )
    outputs.write_parquet(out / TOKENS_FILE, _tokens(ranked, passages))
    text = markdown(ctx, ranked, request, continuations, passages)
    outputs.write_text(out / MARKDOWN_FILE, text)
    print(text, flush=True)


class _Passages:
    """The top passages' ids, token texts and captions, by position in the training split."""

    def __init__(
        self, positions: np.ndarray, ids: np.ndarray, texts: list[list[str]], captions: list[str]
    ) -> None:
        self._row = {int(p): i for i, p in enumerate(positions)}
        self._ids, self._texts, self._captions = ids, texts, captions

    def id(self, position: int) -> int:
        return int(self._ids[self._row[position]])

    def texts(self, position: int) -> list[str]:
        return self._texts[self._row[position]]

    def caption(self, position: int) -> str:
        return self._captions[self._row[position]]


def _captions(ctx: Context, params: Any, columns: Columns, count: int) -> list[str]:
    """The task's captions of the passages (``Task.describe``), else none."""
    if ctx.task.describe is None or count == 0:
        return [""] * count
    return [str(c) for c in ctx.task.describe(params, columns).get("caption", [""] * count)]


class _Entry(NamedTuple):
    prompt: int
    kind: str
    rank: int
    position: int
    influence: float
    scores: np.ndarray


def _entries(ranked: dict[str, Ranked]) -> Iterator[_Entry]:
    """Every filled slot of the top-k, prompt by prompt within each kind, ranks in order."""
    for kind, r in ranked.items():
        top_k, num_prompts = r.positions.shape
        for q in range(num_prompts):
            for rank in range(top_k):
                if r.positions[rank, q] >= 0:
                    position = int(r.positions[rank, q])
                    yield _Entry(q, kind, rank, position, r.influence[rank, q], r.tokens[rank, q])


def _explanations(
    ranked: dict[str, Ranked], request: "Request", continuations: list[str], passages: _Passages
) -> pa.Table:
    rows = list(_entries(ranked))
    return pa.table(
        {
            "prompt_index": pa.array([e.prompt for e in rows], pa.int32()),
            "prompt": pa.array([request.prompts[e.prompt] for e in rows], pa.string()),
            "continuation": pa.array([continuations[e.prompt] for e in rows], pa.string()),
            "kind": pa.array([e.kind for e in rows], pa.string()),
            "rank": pa.array([e.rank for e in rows], pa.int32()),
            "train_id": pa.array([passages.id(e.position) for e in rows], pa.int64()),
            "influence": pa.array([e.influence for e in rows], pa.float32()),
        }
    )


def _tokens(ranked: dict[str, Ranked], passages: _Passages) -> pa.Table:
    """Every token of each passage among a prompt's top ones, once per (prompt, passage)."""
    columns: dict[str, list] = {k: [] for k in ("prompt_index", "train_id", "position", "token")}
    scores, seen = [], set()
    for e in _entries(ranked):
        if (e.prompt, e.position) in seen:
            continue
        seen.add((e.prompt, e.position))
        texts = passages.texts(e.position)
        columns["prompt_index"] += [e.prompt] * len(texts)
        columns["train_id"] += [passages.id(e.position)] * len(texts)
        columns["position"] += list(range(len(texts)))
        columns["token"] += texts
        scores.append(e.scores[: len(texts)])
    types = {"prompt_index": pa.int32(), "train_id": pa.int64(), "position": pa.int32()}
    table = {k: pa.array(v, types.get(k, pa.string())) for k, v in columns.items()}
    table["score"] = pa.array(np.concatenate(scores or [np.zeros(0)]), pa.float32())
    return pa.table(table)


def _escape(text: str) -> str:
    return _SPECIAL.sub(r"\\\1", text)


def marked_text(texts: list[str], scores: np.ndarray) -> str:
    """The tokens as text, the strongest ``MARKED`` of them (at least one) by |score| in bold with
    their sign (⁺ adds to the influence, ⁻ takes from it); spaces stay outside the bold."""
    scores = np.asarray(scores[: len(texts)], np.float64)
    count = max(1, math.ceil(MARKED * len(texts)))
    strongest = {int(i) for i in np.argsort(-np.abs(scores))[:count] if scores[i] != 0}
    pieces = []
    for i, text in enumerate(texts):
        body = text.lstrip(" ")
        lead = text[: len(text) - len(body)]
        if i in strongest:  # a blank token (a lone word-start piece) shows as ␣
            sign = "⁺" if scores[i] > 0 else "⁻"
            pieces.append(f"{lead if body else ''}**{_escape(body) or '␣'}**{sign}")
        else:
            pieces.append(lead + _escape(body))
    return "".join(pieces).strip()


def markdown(
    ctx: Context,
    ranked: dict[str, Ranked],
    request: "Request",
    continuations: list[str],
    passages: _Passages,
) -> str:
    """explain.md (module docstring)."""
    lines = [
        f"# Explanations: method {ctx.method.name}, task {ctx.task.name}",
        "",
        "Influence of each training passage x on the loss of the continuation z, "
        f"I(x, z) = ⟨∇ℓ(x), P∇L(z)⟩, P ≈ H⁻¹ ({ctx.method.equation}). Proponents: up-weighting "
        "them lowers the loss of the continuation the most; opponents: raises it. In bold, each "
        f"passage's strongest tokens (the top {MARKED:.0%} by |share|), ⁺ adding to its "
        "influence, ⁻ taking from it; the shares sum to the influence.",
    ]
    for q, prompt in enumerate(request.prompts):
        given = request.answers[q] is not None
        how = "given answer" if given else f"greedy continuation, at most {request.steps} tokens"
        lines += ["", f"## Prompt {q}: {_escape(prompt)}", "", f"Continuation ({how}): "]
        lines[-1] += f"**{_escape(continuations[q])}**"
        for kind, r in ranked.items():
            lines += ["", f"### {kind.capitalize()}s", ""]
            for rank in range(r.positions.shape[0]):
                position = int(r.positions[rank, q])
                if position < 0:
                    continue
                caption = passages.caption(position)
                head = (
                    f"{rank + 1}. influence {r.influence[rank, q]:+.3e}, id {passages.id(position)}"
                )
                head += f" ({_escape(caption)})" if caption else ""
                text = marked_text(passages.texts(position), r.tokens[rank, q])
                lines += [f"{head}:", f"   {text}"]
    return "\n".join(lines) + "\n"
