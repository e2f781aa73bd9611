"""Galleries: the examples behind the scores, for a person to look at before believing them.

From one finished run (its scores directory): the ``GALLERY_SIZE`` most self-influential training
examples, and for the first ``NUM_QUERIES`` traced queries their strongest proponents and
opponents (``influence_topk.parquet``), rendered by the task's ``describe`` (``tasks/base.py``):
a PNG grid of captioned images for an image task, a Markdown table for a text task. Written as
``gallery_self_influence.png`` / ``gallery_queries.png`` (or ``gallery.md``) with their rows in
``gallery.json``.
"""

import matplotlib

matplotlib.use("Agg")

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from etils import epath

from methods.base import Context
from runtime import outputs
from scoring.queries import TOPK_FILE
from stages import evaluate

GALLERY_SIZE = 32
NUM_QUERIES = 4
PER_QUERY = 6  # proponents and opponents shown per query


def _positions(scores_dir: epath.Path, split: str) -> tuple[np.ndarray, dict[int, int]]:
    """(the split's ranking scores in position order: self-influence, or the harm to the
    validation loss where there is none (``evaluate.ranking_scores``), id → position): parts are
    in position order, each part's rows too."""
    table = outputs.read_parquet_dir(scores_dir / split)
    ids = table.column("id").to_numpy()
    rankings = evaluate.ranking_scores(table.column_names, lambda c: table.column(c).to_numpy())
    scores = next(iter(rankings.values())) if rankings else np.zeros(len(ids))
    return scores, {int(i): p for p, i in enumerate(ids)}


def _shown(ctx: Context, params: Any, split: str, positions: list[int]) -> dict[str, Any]:
    columns = ctx.split(split).take(np.asarray(positions, np.int64))
    if ctx.task.describe is None:
        return {"caption": [f"id {int(i)}" for i in columns["id"]]}
    return {"id": columns["id"], **ctx.task.describe(params, columns)}


def _grid(path: epath.Path, panels: list[list[tuple[np.ndarray, str]]], title: str) -> None:
    rows, cols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, row in enumerate(panels):
        for c, (image, caption) in enumerate(row):
            image = np.asarray(image, np.float32)
            image = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
            lo, hi = float(image.min()), float(image.max())
            axes[r, c].imshow((image - lo) / (hi - lo + 1e-12), cmap="gray")
            axes[r, c].set_title(caption, fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def write(ctx: Context, params: Any, scores_dir: epath.Path, out: epath.Path, label: str) -> dict:
    """Write the galleries of the run whose scores are in ``scores_dir`` into ``out``."""
    influence, where = _positions(scores_dir, "train")
    top = np.argsort(-influence, kind="stable")[:GALLERY_SIZE].tolist()
    shown = _shown(ctx, params, "train", top)
    result: dict[str, Any] = {
        "run": label,
        "self_influence": [
            {
                "id": int(shown["id"][i]) if "id" in shown else None,
                "caption": shown["caption"][i],
                **_text(shown, i),
                "self_influence": float(influence[p]),
            }
            for i, p in enumerate(top)
        ],
        "queries": [],
    }
    panels = [[]]
    for i, caption in enumerate(shown["caption"]):
        if "image" in shown:
            if len(panels[-1]) == 8:
                panels.append([])
            panels[-1].append((shown["image"][i], f"{caption}\nSI {influence[top[i]]:.3g}"))
    query_panels = _queries(ctx, params, scores_dir, where, result["queries"])
    (out / "gallery.md").write_text(_markdown(result))
    if panels[0]:
        _grid(out / "gallery_self_influence.png", panels, f"most self-influential ({label})")
    if query_panels:
        _grid(out / "gallery_queries.png", query_panels, f"query, proponents, opponents ({label})")
    outputs.write_json(out / "gallery.json", result)
    return result


def _queries(
    ctx: Context, params: Any, scores_dir: epath.Path, where: dict[int, int], entries: list
) -> list[list[tuple[np.ndarray, str]]]:
    """Append each of the first traced queries, with its proponents and opponents, to
    ``entries``; returns their image panels (a row per query) for an image task."""
    if not (scores_dir / TOPK_FILE).exists():
        return []
    panels = []
    traced = outputs.read_parquet(scores_dir / TOPK_FILE).to_pandas()
    _, eval_where = _positions(scores_dir, "eval")
    for query_id in list(dict.fromkeys(traced["query_id"]))[:NUM_QUERIES]:
        rows = traced[(traced["query_id"] == query_id) & (traced["rank"] < PER_QUERY)]
        query = _shown(ctx, params, "eval", [eval_where[int(query_id)]])
        entry = {"query_id": int(query_id), "caption": query["caption"][0], **_text(query, 0)}
        row_panels = (
            [(query["image"][0], f"query: {query['caption'][0]}")] if "image" in query else []
        )
        for kind in ("proponent", "opponent"):
            chosen = rows[rows["kind"] == kind].sort_values("rank")
            seen = _shown(ctx, params, "train", [where[int(t)] for t in chosen["train_id"]])
            values = zip(chosen["train_id"], seen["caption"], chosen["influence"], strict=True)
            entry[kind + "s"] = [
                {"id": int(t), "caption": c, **_text(seen, i), "influence": float(v)}
                for i, (t, c, v) in enumerate(values)
            ]
            if "image" in seen:
                row_panels += [
                    (img, f"{kind[:3]} {c}\n{v:.3g}")
                    for img, c, v in zip(
                        seen["image"], seen["caption"], chosen["influence"], strict=True
                    )
                ]
        entries.append(entry)
        if row_panels:
            panels.append(row_panels)
    return panels


def _text(shown: dict[str, Any], i: int) -> dict[str, str]:
    """{'text': the i-th example's text} for a text task's ``describe``, else nothing."""
    return {"text": str(shown["text"][i])} if "text" in shown else {}


def _cell(row: dict) -> str:
    """A table cell: the example's text (a text task) and its caption, '|' escaped."""
    text = f"{row['text']} — " if "text" in row else ""
    return f"{text}{row['caption']}".replace("|", "\\|").replace("\n", " ")


def _markdown(result: dict) -> str:
    """The galleries as tables (a text task's only view; an image task's index to the PNGs)."""
    lines = [f"# Most self-influential training examples ({result['run']})", ""]
    lines += ["| rank | id | example | self-influence |", "|---|---|---|---|"]
    for rank, row in enumerate(result["self_influence"]):
        lines.append(f"| {rank + 1} | {row['id']} | {_cell(row)} | {row['self_influence']:.4g} |")
    for query in result["queries"]:
        lines += ["", f"## Query {query['query_id']}: {_cell(query)}", ""]
        lines += ["| kind | id | example | influence |", "|---|---|---|---|"]
        for kind in ("proponents", "opponents"):
            for row in query[kind]:
                lines.append(
                    f"| {kind[:-1]} | {row['id']} | {_cell(row)} | {row['influence']:.4g} |"
                )
    return "\n".join(lines) + "\n"
