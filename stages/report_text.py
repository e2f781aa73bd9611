"""What the report job (``stages/report.py``) computes from its runs and how it shows them:
the Figure 1 errors, the Ritz diagnostics in words, the two PNGs and the Markdown."""

import matplotlib

matplotlib.use("Agg")

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from etils import epath
from ml_collections import ConfigDict

from methods.base import Method
from runtime import outputs


def swept(rows: list[dict]) -> list[str]:
    """The methods whose p̃ the report swept (``Method.keeps_top_k``), in the rows' order."""
    return list(dict.fromkeys(r["method"] for r in rows if r["swept"]))


def _by_magnitude(values: Any) -> np.ndarray:
    values = np.asarray(values, np.float64)
    return values[np.argsort(-np.abs(values), kind="stable")]


def _matched(estimates: Any, reference: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both sets sorted by value: the pairing of the 1-D Wasserstein distance (by rank of |λ|,
    a +λ and a −λ of about the same size would be paired with each other's sign)."""
    return np.sort(np.asarray(estimates, np.float64)), np.sort(np.asarray(reference, np.float64))


def eigenvalue_errors(rows: list[dict], top_ks: list[int]) -> dict[str, Any]:
    """Figure 1: per swept method and p̃, the Wasserstein-1 distance between its p̃ eigenvalue
    estimates and the exact top p̃ (by |λ|): the mean |difference| of the two sorted sets, as in
    the paper; and the largest relative error of the pairs it matches. Empty without the
    reference (``Method.reference``: exact)."""
    exact = next((r for r in rows if r["reference"]), None)
    if exact is None:
        return {}
    reference = _by_magnitude(exact["eigvals"])
    result: dict[str, Any] = {"top_ks": top_ks}
    for method in swept(rows):
        found = {r["top_k"]: r for r in rows if r["method"] == method}
        if not found:
            continue
        wasserstein, relative = [], []
        for k in top_ks:
            est, ref = _matched(found[k]["eigvals"][:k], reference[:k])
            wasserstein.append(float(np.mean(np.abs(est - ref))))
            relative.append(float(np.max(np.abs(est - ref) / np.abs(ref))))
        result[method] = {"wasserstein": wasserstein, "max_relative_error": relative}
    return result


def ritz_diagnostics(
    rows: list[dict], seeds: dict | None, tol: float, method: Method, config: ConfigDict
) -> dict[str, Any]:
    """How many of ``method``'s kept pairs converged (relative Ritz residual ‖Hv − λv‖/|λ| < tol,
    ``influence/distill.ritz_pairs``), how far its top eigenvalues move between two seeds, and
    what to raise (``Method.advice``), in words."""
    runs = [r for r in rows if r["method"] == method.name]
    if not runs:
        return {}
    largest = max(runs, key=lambda r: r["top_k"])
    eig = outputs.read_json(epath.Path(largest["eig_file"]))
    relative = np.asarray(eig["relative_ritz_residuals"])
    converged = int((relative < tol).sum())
    words = [
        f"{converged} of the {relative.size} kept Ritz pairs of {method.name} have converged "
        f"(relative Ritz residual below {tol:g})."
    ]
    result: dict[str, Any] = {"converged": converged, "kept": int(relative.size), "tol": tol}
    move = None
    if seeds is not None:
        first, second = _matched(*seeds["eigvals"])
        moves = np.abs(second - first) / np.abs(first)
        move = float(moves.max())
        result.update(seeds=seeds["seeds"], max_move=move, median_move=float(np.median(moves)))
        words.append(
            f"Between {method.seed_field}={seeds['seeds'][0]} and {seeds['seeds'][1]} the top-"
            f"{moves.size} eigenvalues move by up to {100 * move:.2f}% (median "
            f"{100 * np.median(moves):.2f}%)."
        )
    if method.advice is not None:
        words += method.advice(config, converged, int(relative.size), move)
    result["words"] = words
    return result


def plot_eigenvalue_errors(path: epath.Path, figure: dict) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in figure:
        if method != "top_ks":
            ax.semilogy(figure["top_ks"], figure[method]["wasserstein"], "o-", label=method)
    if len(figure) > 1:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no exact Hessian: nothing to compare", ha="center", va="center")
    ax.set(
        xlabel="p̃",
        ylabel="Wasserstein-1 to the exact top p̃",
        title="Top eigenvalue estimates (Fig. 1)",
    )
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def plot_retrieval(path: epath.Path, rows: list[dict]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("auc", "ap"), strict=True):
        for method in swept(rows):
            found = sorted((r["top_k"], r[metric]) for r in rows if r["method"] == method)
            ax.plot(*zip(*found, strict=True), "o-", label=method)
        for r in rows:
            if not r["swept"]:
                ax.axhline(r[metric], ls="--", lw=1, color=f"C{3 + len(ax.lines) % 6}")
                ax.lines[-1].set_label(r["method"])
        ax.set(xlabel="p̃", ylabel=metric.upper(), title=f"Mislabeled retrieval {metric.upper()}")
        ax.set_xscale("log")
        ks = sorted({r["top_k"] for r in rows if r["swept"]})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def _table(rows: list[dict]) -> list[str]:
    """Table 1 in Markdown: a row per run, with Spearman against the reference where it ran."""
    reference = next((r["method"] for r in rows if r["reference"]), None)
    spearman = any("spearman_reference" in r for r in rows)
    head = "| method | p̃ | fit s | score s | AUC | AP | recall@10% | recall@20% |"
    head += f" Spearman w/ {reference} |" if spearman else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        top_k = r["top_k"] if r["swept"] else "–"
        top_k = f"all ({r['top_k']:,})" if r["reference"] else top_k
        cells = [
            r["method"],
            str(top_k),
            f"{r['fit_s']:.1f}",
            f"{r['score_s']:.1f}",
            f"{100 * r['auc']:.2f}",
            f"{100 * r['ap']:.2f}",
            f"{100 * r['recall_at_10pct']:.1f}",
            f"{100 * r['recall_at_20pct']:.1f}",
        ]
        if spearman:
            cells.append(f"{r['spearman_reference']:.3f}" if "spearman_reference" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _query_table(rows: list[dict]) -> list[str]:
    """The traced queries' retrieval of their relevant training examples (a task with a
    ``relevance_column``: the LM's planted facts), a row per ranking of each run; [] without."""
    if not any("query_auc" in r for r in rows):
        return []
    lines = [
        "Traced queries against the training examples relevant to them (planted facts: the",
        "passages that state each; means over the queries):",
        "",
        "| method | p̃ | ranking | recall@10 | MRR | AUC |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        for suffix, ranking in (("", "influence"), ("_tail", "influence + tail")):
            if f"query_auc{suffix}" in r:
                top_k = r["top_k"] if r["swept"] else "–"
                values = (r[f"query_{k}{suffix}"] for k in ("recall_at_10", "mrr", "auc"))
                cells = [r["method"], str(top_k), ranking, *(f"{v:.3f}" for v in values)]
                lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown(report: dict) -> str:
    lines = [
        f"# Influence report: {report['task']} / {report['model']}",
        "",
        f"{report['num_params']:,} params, {report['num_train']:,} training examples; "
        "mislabeled retrieval by self-influence (the paper's Table 1 protocol).",
        "",
        *_table(report["rows"]),
        "",
        "Times in seconds, from the run that computed each result (compile included); the",
        "first row of a method with shared state (Arnoldi's Krylov iterations) includes it.",
        "",
        *_query_table(report["rows"]),
        "![Figure 1](report_eigenvalues.png)",
        "",
    ]
    figure = report["figure1"]
    for method in figure:
        if method != "top_ks":
            pairs = ", ".join(
                f"p̃={k}: {w:.3g} ({100 * e:.3g}%)"
                for k, w, e in zip(
                    figure["top_ks"],
                    figure[method]["wasserstein"],
                    figure[method]["max_relative_error"],
                    strict=True,
                )
            )
            lines.append(f"- {method}: Wasserstein-1 (largest relative error) {pairs}")
    lines += ["", "![Figure 2](report_retrieval.png)", ""]
    lines += [
        f"Galleries of {report['gallery']} ([gallery.md](gallery.md)):",
        "",
        "![most self-influential](gallery_self_influence.png)",
        "",
        "![queries](gallery_queries.png)",
        "",
        "## Ritz diagnostics",
        "",
    ]
    lines += [f"- {w}" for w in report["ritz"].get("words", [])]
    lines += [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"
