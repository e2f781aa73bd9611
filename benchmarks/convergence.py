"""Convergence of inverse-Hessian-vector solvers on synthetic curvature (HyperINF §4.1).

    .venv/bin/python -m benchmarks.convergence [--dims=512,1024,2048,4096]
        [--num_samples=200,800,6400] [--max_iters=40] [--lissa_depth=1000] [--arnoldi_iters=256]
        [--out=workdirs/convergence]

For every (d, N): A = (1/N) Σ_{i≤N} x_i x_iᵀ + 0.01 I with x_i ~ N(0, I_d), a random v ~ N(0, I_d),
and the truth A⁻¹v in float64 (numpy, of the float32 A every method sees). Each method runs in
float32 and its relative error ‖A⁻¹v − x̂‖ / ‖A⁻¹v‖ is recorded after every iteration:

- Schulz (``influence/schulz.py``) from the default start X₀ = I / min(‖A‖_∞, ‖A‖_F) and from
  the public HyperINF code's X₀ = 5·10⁻⁵ I; x̂ = X_k v; until the float32 floor or ``--max_iters``.
  One iteration is two d × d matmuls (2·2d³ flops).
- LiSSA (``influence.solvers.lissa``; deterministic, the full A, no extra damping): h_j = v +
  h_{j−1} − A h_{j−1}/s, x̂ = h_j/s, with s = 1.1 × a 50-step power-iteration estimate of λ_max
  (convergent for s > λ_max/2); error (1 − λ_min/s)^j. One iteration is one matvec (2d²).
- DataInf (``influence/datainf.py``) with g_i = x_i and λ = 0.01: closed form, one number.
- Arnoldi (``influence/krylov.py`` with the matvec v ↦ Av as its HVP, ``influence/distill.py``)
  after m ≤ ``--arnoldi_iters`` iterations: H⁻¹ ≈ Gᵀdiag(1/λ)G + (I − GᵀG)/σ with all m Ritz
  pairs and σ = 0.01 (``scoring.tail_sigma("damping")``: exact on the d − N null directions of
  the data term when N < d), and with the top m/2 pairs and σ the harmonic mean of the rest
  (``tail_sigma("ritz")``). One iteration is one matvec plus Gram–Schmidt. For N < d the Krylov
  space of A = (data of rank N) + 0.01 I is invariant after about N + 1 iterations (Arnoldi stops
  there: a breakdown), hence n = 256 > 200 by default.

Writes ``<out>/convergence.png`` (one panel per (d, N): error against iterations, log–log; the
iterations differ in cost, hence the wall times) and ``<out>/convergence.json`` (every curve),
and prints two Markdown tables: the final relative errors, and the iterations each iterative
method needed to reach 10⁻³ / 10⁻⁵ with its wall time (compiled, on this machine's CPU).
"""

import functools
import json
import time
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import scipy.linalg
from absl import app, flags
from etils import epath

from influence import datainf, distill, krylov, schulz, scoring, solvers

_DIMS = flags.DEFINE_list("dims", ["512", "1024", "2048", "4096"], "d, the matrix sizes.")
_NUM_SAMPLES = flags.DEFINE_list("num_samples", ["200", "800", "6400"], "N, samples per matrix.")
_MAX_ITERS = flags.DEFINE_integer("max_iters", 40, "Schulz iterations at most (each start).")
_LISSA_DEPTH = flags.DEFINE_integer("lissa_depth", 1000, "LiSSA iterations.")
_ARNOLDI_ITERS = flags.DEFINE_integer("arnoldi_iters", 256, "Arnoldi iterations n.")
_OUT = flags.DEFINE_string("out", "workdirs/convergence", "Where the PNG and the JSON go.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the samples and of v.")

DAMPING = 0.01
HIGHEST = jax.lax.Precision.HIGHEST
THRESHOLDS = (1e-3, 1e-5)
ITERATIVE = ("schulz", "schulz_reference", "lissa", "arnoldi_damping", "arnoldi_ritz")
LABELS = {
    "schulz": "Schulz, X₀ = I/min(‖A‖∞, ‖A‖F)",
    "schulz_reference": "Schulz, X₀ = 5e-5 I (public code)",
    "lissa": "LiSSA",
    "datainf": "DataInf",
    "arnoldi_damping": "Arnoldi, all m pairs + tail σ = 0.01",
    "arnoldi_ritz": "Arnoldi, m/2 pairs + Ritz tail",
}


def timed(fn: Callable, *args: object) -> tuple[object, float]:
    """fn(*args) with its outputs ready, and the seconds it took."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def extreme_eigenvalues(a: np.ndarray, iters: int = 50) -> tuple[float, float]:
    """(λ_max, λ_min) of the SPD float64 ``a``: power iteration and inverse iteration (Cholesky);
    Rayleigh quotients, so λ_max from below and λ_min from above."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=len(a))
    for _ in range(iters):
        x = a @ x
        x /= np.linalg.norm(x)
    top = float(x @ a @ x)
    factor = scipy.linalg.cho_factor(a)
    y = rng.normal(size=len(a))
    for _ in range(iters):
        y = scipy.linalg.cho_solve(factor, y)
        y /= np.linalg.norm(y)
    return top, float(y @ a @ y)


def schulz_curve(a: jax.Array, v: jax.Array, truth: np.ndarray, start: str) -> tuple[list, float]:
    run = functools.partial(schulz.schulz_trace, tol=0.0, max_iters=_MAX_ITERS.value, start=start)
    compiled = jax.jit(run).lower(a, v).compile()
    trace, seconds = timed(compiled, a, v)
    done = int(trace.result.iterations)
    solutions = np.asarray(trace.solutions[: done + 1], np.float64)
    errors = np.linalg.norm(solutions - truth, axis=1) / np.linalg.norm(truth)
    return [float(e) if np.isfinite(e) else float("inf") for e in errors], seconds


def lissa_curve(a: jax.Array, v: jax.Array, truth: np.ndarray, scale: float) -> tuple[list, float]:
    """``solvers.lissa`` on one row; the matvec also records the error of each iterate h_j / s."""
    truth32 = jnp.asarray(truth, jnp.float32)[None]
    product = jax.jit(lambda h: jnp.matmul(h, a, precision=HIGHEST))  # rows · A, A symmetric
    error = jax.jit(lambda h: jnp.linalg.norm(h / scale - truth32))
    recorded = []

    def matvec(j: int, h: jax.Array) -> jax.Array:
        recorded.append(error(h))
        return product(h)

    solvers.lissa(matvec, v[None], damping=0.0, scale=scale, depth=2)  # compile
    recorded.clear()
    start = time.perf_counter()
    estimate = jax.block_until_ready(
        solvers.lissa(matvec, v[None], damping=0.0, scale=scale, depth=_LISSA_DEPTH.value)
    )
    seconds = time.perf_counter() - start
    recorded.append(error(estimate * scale))
    norm = np.linalg.norm(truth)
    return [float(e) / norm for e in recorded], seconds


def arnoldi_curves(
    a: jax.Array, v: jax.Array, truth: np.ndarray, seed: int
) -> tuple[dict[str, list], float]:
    """Errors after m = 1, 2, … iterations (a log-spaced grid of m) of one Arnoldi run."""
    n, d = _ARNOLDI_ITERS.value, a.shape[0]
    hvp = lambda params, batch, q: jnp.matmul(params, q, precision=HIGHEST)  # noqa: E731
    step = jax.jit(functools.partial(krylov.arnoldi_step, hvp))
    state = krylov.init_state(jnp.zeros(d, jnp.float32), n, jax.random.key(seed))
    krylov.run_arnoldi(step, state, a, lambda k: None, 2)  # compile
    start = time.perf_counter()
    result = krylov.run_arnoldi(step, state, a, lambda k: None, n)
    jax.block_until_ready(result.state)
    seconds = time.perf_counter() - start
    hessenberg = np.asarray(result.state["hessenberg"])
    basis = np.asarray(result.state["krylov_basis"], np.float64)
    v64, norm = np.asarray(v, np.float64), np.linalg.norm(truth)
    curves: dict[str, list] = {"arnoldi_damping": [], "arnoldi_ritz": []}
    grid = sorted({*np.geomspace(1, result.num_completed, 40).astype(int), result.num_completed})
    for m in grid:
        # distill.distill's lines 11–18 with G = Uᵀ Q in float64 numpy: no compile per m.
        pairs = distill.ritz_pairs(hessenberg, m, top_k=m)
        g_all = pairs.coords @ basis[:m]
        for name in ("arnoldi_damping", "arnoldi_ritz"):
            if name == "arnoldi_damping":
                keep = m
                sigma = scoring.tail_sigma(
                    "damping", l2=0.0, damping=DAMPING, ritz_values=pairs.eigvals, top_k=keep
                )
            elif m < 2:
                continue
            else:  # A already holds the damping: the Ritz values are its eigenvalue estimates
                keep = m // 2
                sigma = scoring.tail_sigma(
                    "ritz", l2=0.0, damping=0.0, ritz_values=pairs.eigvals, top_k=keep
                )
            g = g_all[:keep]
            coords = g @ v64
            estimate = g.T @ (coords / pairs.eigvals[:keep]) + (v64 - g.T @ coords) / sigma
            curves[name].append((int(m), float(np.linalg.norm(estimate - truth) / norm)))
    return curves, seconds


def first_below(errors: list[float], threshold: float, iterations: list[int] | None = None) -> str:
    for k, e in enumerate(errors):
        if e <= threshold:
            return str(iterations[k] if iterations is not None else k)
    return "–"


def run_one(d: int, n: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, d, n])
    x = rng.normal(size=(n, d)).astype(np.float32)
    v = rng.normal(size=d).astype(np.float32)
    x64 = x.astype(np.float64)
    a32 = (x64.T @ x64 / n + DAMPING * np.eye(d)).astype(np.float32)  # what every method sees
    a, xj, a64 = jnp.asarray(a32), jnp.asarray(x), a32.astype(np.float64)
    truth = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a64), v.astype(np.float64))
    top, bottom = extreme_eigenvalues(a64)
    scale = 1.1 * top
    row: dict = {"d": d, "N": n, "lambda_max": top, "lambda_min": bottom, "lissa_scale": scale}
    curves, seconds = {}, {}
    vj = jnp.asarray(v)
    for name, start in (("schulz", "scaled_identity"), ("schulz_reference", "reference")):
        curves[name], seconds[name] = schulz_curve(a, vj, truth, start)
    curves["lissa"], seconds["lissa"] = lissa_curve(a, vj, truth, scale)
    apply = jax.jit(functools.partial(datainf.datainf_apply, damping=DAMPING))
    apply(xj, vj)  # compile
    estimate, seconds["datainf"] = timed(apply, xj, vj)
    datainf_error = np.linalg.norm(np.asarray(estimate, np.float64) - truth) / np.linalg.norm(truth)
    arnoldi_pairs, seconds["arnoldi"] = arnoldi_curves(a, vj, truth, seed)
    row.update(curves=curves, arnoldi=arnoldi_pairs, datainf=float(datainf_error), seconds=seconds)
    return row


def final_errors(row: dict) -> dict[str, float]:
    out = {name: row["curves"][name][-1] for name in ("schulz", "schulz_reference", "lissa")}
    out["datainf"] = row["datainf"]
    for name, pairs in row["arnoldi"].items():
        out[name] = pairs[-1][1] if pairs else float("nan")
    return out


def tables(rows: list[dict]) -> str:
    names = ("schulz", "schulz_reference", "lissa", "datainf", "arnoldi_damping", "arnoldi_ritz")
    head = "| d | N | κ | " + " | ".join(LABELS[k] for k in names) + " |"
    lines = ["Final relative error ‖A⁻¹v − x̂‖/‖A⁻¹v‖ (float32; each method's full budget)", ""]
    lines += [head, "|" + "---|" * (3 + len(names))]
    for row in rows:
        errs = final_errors(row)
        kappa = row["lambda_max"] / row["lambda_min"]
        cells = " | ".join(f"{errs[k]:.1e}" for k in names)
        lines.append(f"| {row['d']} | {row['N']} | {kappa:.3g} | {cells} |")
    lines += ["", "Iterations to relative error 1e-3 / 1e-5, and wall time (s)", ""]
    timed_names = ("schulz", "schulz_reference", "lissa", "arnoldi_damping")
    head = "| d | N | " + " | ".join(LABELS[k] for k in timed_names) + " | DataInf |"
    lines += [head, "|" + "---|" * (3 + len(timed_names))]
    for row in rows:
        cells = []
        for name in timed_names:
            if name.startswith("arnoldi"):
                its = [m for m, _ in row["arnoldi"][name]]
                errs = [e for _, e in row["arnoldi"][name]]
                seconds = row["seconds"]["arnoldi"]
            else:
                its, errs, seconds = None, row["curves"][name], row["seconds"][name]
            reach = " / ".join(first_below(errs, t, its) for t in THRESHOLDS)
            cells.append(f"{reach} ({seconds:.2f} s)")
        lines.append(
            f"| {row['d']} | {row['N']} | "
            + " | ".join(cells)
            + f" | 0 ({row['seconds']['datainf']:.3f} s) |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: epath.Path) -> None:
    dims = sorted({r["d"] for r in rows})
    samples = sorted({r["N"] for r in rows})
    fig, axes = plt.subplots(
        len(dims), len(samples), figsize=(4.2 * len(samples), 3.2 * len(dims)), squeeze=False
    )
    for row in rows:
        ax = axes[dims.index(row["d"])][samples.index(row["N"])]
        for name in ("schulz", "schulz_reference", "lissa"):
            errs = np.asarray(row["curves"][name])
            its = np.arange(len(errs))
            ax.plot(its[1:], np.minimum(errs[1:], 1e3), label=LABELS[name], lw=1.2)
        for name, pairs in row["arnoldi"].items():
            if pairs:
                ax.plot(*zip(*pairs, strict=True), label=LABELS[name], lw=1.2)
        ax.axhline(row["datainf"], color="gray", ls="--", lw=1, label=LABELS["datainf"])
        kappa = row["lambda_max"] / row["lambda_min"]
        ax.set(xscale="log", yscale="log", title=f"d={row['d']}, N={row['N']}, κ={kappa:.2g}")
        ax.set_xlabel("iterations")
        ax.set_ylabel("relative error")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    out = epath.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.perf_counter()
    for d in map(int, _DIMS.value):
        for n in map(int, _NUM_SAMPLES.value):
            began = time.perf_counter()
            rows.append(run_one(d, n, _SEED.value))
            print(f"d={d}, N={n}: {time.perf_counter() - began:.1f} s", flush=True)
    print(f"total {time.perf_counter() - start:.1f} s\n")
    print(tables(rows))
    plot(rows, out / "convergence.png")
    (out / "convergence.json").write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {out / 'convergence.png'} and {out / 'convergence.json'}")


if __name__ == "__main__":
    app.run(main)
