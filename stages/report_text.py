"""What the report job (``stages/report.py``) computes from its runs and how it shows them:
the Figure 1 errors, the Ritz diagnostics in words, the two PNGs and the Markdown."""

import matplotlib

matplotlib.use("Agg")

from typing import Any

import matplotlib.pyplot as plt
import ml_collections
import numpy as np
from etils import epath

from runtime import outputs

SWEPT = ("arnoldi", "randproj", "randselect")  # the methods whose p̃ the report sweeps
SEED_SPREAD_WARN = 0.05  # top eigenvalues moving more than this between seeds: say what to raise


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
    the paper; and the largest relative error of the pairs it matches. Empty without exact."""
    exact = next((r for r in rows if r["method"] == "exact"), None)
    if exact is None:
        return {}
    reference = _by_magnitude(exact["eigvals"])
    result: dict[str, Any] = {"top_ks": top_ks}
    for method in SWEPT:
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
    rows: list[dict], seeds: dict | None, tol: float, config: ml_collections.ConfigDict
) -> dict[str, Any]:
    """How many of Arnoldi's kept pairs converged (relative Ritz residual ‖Hv − λv‖/|λ| < tol,
    ``influence/distill.ritz_pairs``), how far its top eigenvalues move between two seeds, and
    what to raise, in words."""
    arnoldi = [r for r in rows if r["method"] == "arnoldi"]
    if not arnoldi:
        return {}
    largest = max(arnoldi, key=lambda r: r["top_k"])
    eig = outputs.read_json(epath.Path(largest["eig_file"]))
    relative = np.asarray(eig["relative_ritz_residuals"])
    converged = int((relative < tol).sum())
    a = config.arnoldi
    words = [
        f"{converged} of the {relative.size} kept Ritz pairs have converged (relative Ritz "
        f"residual below {tol:g}; n = {a.num_iters} iterations, b = {a.hvp_batch_size}"
        f"{', one fixed batch' if a.fixed_batch else ', a fresh batch per HVP'})."
    ]
    if converged < relative.size / 2:
        words.append(
            f"Fewer than half converged: raise arnoldi.num_iters (n = {a.num_iters}); the "
            "unconverged pairs mix eigenvectors and their 1/λ weights are unreliable."
        )
    result = {"converged": converged, "kept": int(relative.size), "tol": tol}
    if seeds is not None:
        first, second = _matched(*seeds["eigvals"])
        move = np.abs(second - first) / np.abs(first)
        result.update(
            seeds=seeds["seeds"], max_move=float(move.max()), median_move=float(np.median(move))
        )
        words.append(
            f"Between arnoldi.seed={seeds['seeds'][0]} and {seeds['seeds'][1]} the top-"
            f"{move.size} eigenvalues move by up to {100 * move.max():.2f}% (median "
            f"{100 * np.median(move):.2f}%)."
        )
        if move.max() > SEED_SPREAD_WARN:
            words.append(
                "That is more than "
                f"{100 * SEED_SPREAD_WARN:.0f}%: "
                + (
                    f"raise arnoldi.hvp_batch_size (b = {a.hvp_batch_size}) or set "
                    "arnoldi.fixed_batch=true: the fresh batches' sampling noise dominates."
                    if not a.fixed_batch
                    else f"raise arnoldi.num_iters (n = {a.num_iters})."
                )
            )
    result["words"] = words
    return result


def plot_eigenvalue_errors(path: epath.Path, figure: dict) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in SWEPT:
        if method in figure:
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
        for method in SWEPT:
            found = sorted((r["top_k"], r[metric]) for r in rows if r["method"] == method)
            if found:
                ax.plot(*zip(*found, strict=True), "o-", label=method)
        for r in rows:
            if r["method"] not in SWEPT:
                ax.axhline(r[metric], ls="--", lw=1, color=f"C{3 + len(ax.lines) % 6}")
                ax.lines[-1].set_label(r["method"])
        ax.set(xlabel="p̃", ylabel=metric.upper(), title=f"Mislabeled retrieval {metric.upper()}")
        ax.set_xscale("log")
        ks = sorted({r["top_k"] for r in rows if r["method"] in SWEPT})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def markdown(report: dict) -> str:
    rows = report["rows"]
    spearman = any("spearman_exact" in r for r in rows)
    head = "| method | p̃ | fit s | score s | AUC | AP | recall@10% | recall@20% |"
    head += " Spearman w/ exact |" if spearman else ""
    lines = [
        f"# Influence report: {report['task']} / {report['model']}",
        "",
        f"{report['num_params']:,} params, {report['num_train']:,} training examples; "
        "mislabeled retrieval by self-influence (the paper's Table 1 protocol).",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        top_k = r["top_k"] if r["method"] in SWEPT else "–"
        top_k = f"all ({r['top_k']:,})" if r["method"] == "exact" else top_k
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
            cells.append(f"{r['spearman_exact']:.3f}" if "spearman_exact" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Times in seconds, from the run that computed each result (compile included); the",
        "first Arnoldi row's fit includes the Krylov iterations every Arnoldi row shares.",
        "",
        "![Figure 1](report_eigenvalues.png)",
        "",
    ]
    figure = report["figure1"]
    for method in SWEPT:
        if method in figure:
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
