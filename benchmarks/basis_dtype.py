r"""What a bfloat16 Krylov basis costs in accuracy against float32, on two real workloads.

    .venv/bin/python -m benchmarks.basis_dtype [--workloads=flax_cnn,transformer_small] \
        [--num_iters=50] [--top_k=20] [--out=workdirs/basis_dtype]

``arnoldi.basis_dtype=bfloat16`` stores the Krylov basis in bfloat16 (half its bytes); the HVP,
every Gram–Schmidt dot product and update, the Hessenberg matrix and the distilled eigenvectors
stay float32 (``methods/arnoldi.py``, ``influence/krylov.py``). For each workload, ``jobs.pipeline``
(train → fit → score → evaluate) runs in its own process, as a user runs it, in
``<out>/<workload>/float32`` with a float32 basis; ``<out>/<workload>/bfloat16`` then gets that
run's trained params (``params/``, ``epoch_params/``, ``corrupted.parquet``: the train stage finds
them and trains nothing) and the pipeline runs again with ``--config.arnoldi.basis_dtype=bfloat16``:
the same params, data, ``arnoldi.seed`` (start vector and HVP batches) and scoring mode
(``--score_mode``, fixed so both score with the same program). Finished stages are reused, so a
second run of the command only reads the results. Each pipeline's log is kept beside its workdir
(``pipeline.log``).

Per workload it reports, bfloat16 against float32: the relative error |λ_bf16 − λ_f32| / |λ_f32|
of each of the top-p̃ eigenvalues (``fit.json``, both ordered by |λ|; max and median over the p̃,
and λ₁'s), the Spearman rank correlation of the training split's self-influence
(``scores/train``, matched by example id), the overlap of the top 1% and top 5% of that
self-influence (|both| / k), the basis' bytes on the most loaded device (the fit's log line; the
basis kept there, ``arnoldi.basis_storage=device``) and the AUC of finding the corrupted examples
(``metrics.json``). It prints one Markdown table row per workload and writes
``<out>/basis_dtype.json``.

Sizes (the defaults; 655 s in all on a 2-core CPU with tests running beside it, training both
models included):

- ``flax_cnn``: ``configs/mnist.py:model=flax_cnn`` as it is: the Flax CNN (824,458 params),
  4,000 MNIST training examples (20% flipped) + 1,000 eval, 8 epochs; n = ``--num_iters``
  (50), b = 512, p̃ = ``--top_k`` (20); scores 4,000 + 1,000 examples.
- ``transformer_small``: ``configs/translation.py:model=small`` (294k params at vocab 2,000) on
  1,024 training pairs (6.25% shuffled) + 128 eval, 10 epochs; n = 50, b = 64 (the config's
  256 / 4), p̃ = 20; scores 1,024 + 128 pairs.

``--runlocal`` adds each config's ``runlocal`` preset and drops the sizes above (a smoke run of
about 3 minutes on 2 cores with ``--num_iters=12 --top_k=4``).
"""

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats
from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")
TOP_FRACTIONS = (0.01, 0.05)
# (config file:presets, size overrides) of each workload; --num_iters, --top_k and the scoring
# mode are added to both.
WORKLOADS = {
    "flax_cnn": ("configs/mnist.py:model=flax_cnn", {}),
    "transformer_small": (
        "configs/translation.py:model=small",
        {
            "data.num_train": 1024,
            "data.num_eval": 128,
            "arnoldi.hvp_batch_size": 64,
        },
    ),
}
BASIS_LINE = re.compile(
    r"Krylov basis: (\d+) vectors x (\d+) params in (\w+), ([\d.]+) MiB on the most loaded device"
)

_WORKLOADS = flags.DEFINE_list("workloads", list(WORKLOADS), f"Of {sorted(WORKLOADS)}.")
_NUM_ITERS = flags.DEFINE_integer("num_iters", 50, "arnoldi.num_iters (n) of both fits.")
_TOP_K = flags.DEFINE_integer("top_k", 20, "distill.top_k (p̃) of both fits.")
_SCORE_MODE = flags.DEFINE_enum(
    "score_mode", "reverse", ["forward", "reverse", "auto"], "score.mode of both runs."
)
_RUNLOCAL = flags.DEFINE_bool("runlocal", False, "Smoke run: the configs' runlocal preset.")
_OUT = flags.DEFINE_string("out", "workdirs/basis_dtype", "Directory of the workdirs and JSON.")


def spec_and_sizes(workload: str) -> tuple[str, dict[str, object]]:
    """(config file:presets, size overrides) of a workload, under ``--runlocal`` too."""
    spec, sizes = WORKLOADS[workload]
    return (f"{spec},runlocal", {}) if _RUNLOCAL.value else (spec, sizes)


def hvp_batch_size(workload: str) -> int:
    """b, the examples per HVP of the workload's fits (its size override, else its config's)."""
    spec, sizes = spec_and_sizes(workload)
    path, _, presets = spec.partition(":")
    config = importlib.import_module(path.removesuffix(".py").replace("/", ".")).get_config(presets)
    return int(sizes.get("arnoldi.hvp_batch_size", config.arnoldi.hvp_batch_size))


def config_flags(workload: str, dtype: str) -> list[str]:
    """The ``--config=...`` and ``--config.<field>=...`` flags of one pipeline run."""
    spec, sizes = spec_and_sizes(workload)
    fields = {
        **sizes,
        "arnoldi.num_iters": _NUM_ITERS.value,
        "distill.top_k": _TOP_K.value,
        "score.mode": _SCORE_MODE.value,
        "arnoldi.basis_storage": "device",  # the bytes measured are the devices'
        "arnoldi.basis_dtype": dtype,
    }
    return [f"--config={spec}", *(f"--config.{k}={v}" for k, v in fields.items())]


def run_pipeline(workload: str, dtype: str, workdir: Path) -> tuple[float, str]:
    """``jobs.pipeline`` on ``workdir`` in a fresh process: (wall seconds, its log), the log also
    written to ``<workdir>/pipeline.log``."""
    command = [
        sys.executable,
        "-m",
        "jobs.pipeline",
        f"--workdir={workdir}",
        *config_flags(workload, dtype),
    ]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    print(" ".join(command[1:]), flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "pipeline.log"
    start = time.perf_counter()
    with path.open("w") as sink:  # written as it runs: `tail -f` shows the progress
        done = subprocess.run(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    log = path.read_text()
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{log[-3000:]}")
    return seconds, log


def copy_trained(trained: Path, workdir: Path) -> None:
    """``workdir`` holding the trained params of ``trained`` (as tests/pipeline_helpers does),
    unless it holds params already (a second run of the benchmark)."""
    if (workdir / "params").exists():
        return
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("params", "epoch_params"):
        if (trained / name).exists():
            shutil.copytree(trained / name, workdir / name)
    shutil.copy(trained / "corrupted.parquet", workdir / "corrupted.parquet")


def basis_size(log: str, workdir: Path, dtype: str) -> dict[str, float]:
    """The Krylov basis' vectors, params and MiB on the most loaded device, from the fit's log
    line; kept in ``<workdir>/basis.json`` for a later run that reuses the fit (and logs none)."""
    saved = workdir / "basis.json"
    found = BASIS_LINE.search(log)
    if found is None:
        return json.loads(saved.read_text())
    if found.group(3) != dtype:
        raise RuntimeError(f"the fit in {workdir} ran with a {found.group(3)} basis, not {dtype}")
    size = {"vectors": int(found.group(1)), "params": int(found.group(2))}
    size["mib"] = float(found.group(4))
    saved.write_text(json.dumps(size))
    return size


def results(workdir: Path) -> Path:
    return workdir / "methods" / "arnoldi"


def self_influence(workdir: Path) -> pd.Series:
    """The training split's self-influence, indexed by example id."""
    table = pd.read_parquet(results(workdir) / "scores" / "train", columns=["id", "self_influence"])
    if not table["id"].is_unique:
        raise RuntimeError(f"duplicate ids in the scores of {workdir}")
    return table.set_index("id")["self_influence"].sort_index()


def top_overlap(a: pd.Series, b: pd.Series, fraction: float) -> float:
    """|top-k of a ∩ top-k of b| / k, k = ``fraction`` of the examples (at least 1)."""
    k = max(1, round(fraction * len(a)))
    return len(set(a.nlargest(k).index) & set(b.nlargest(k).index)) / k


def compare(workdirs: dict[str, Path]) -> dict[str, float]:
    """bfloat16 against float32: eigenvalues, self-influence ranks, retrieval."""
    fits = {d: json.loads((results(w) / "fit.json").read_text()) for d, w in workdirs.items()}
    ref, low = (np.asarray(fits[d]["eigvals"], np.float64) for d in DTYPES)
    rel = np.abs(low - ref) / np.abs(ref)
    scores = {d: self_influence(w) for d, w in workdirs.items()}
    ref_s, low_s = scores["float32"], scores["bfloat16"]
    if not ref_s.index.equals(low_s.index):
        raise RuntimeError("the two runs scored different examples")
    auc = {
        d: json.loads((results(w) / "metrics.json").read_text())["auc"] for d, w in workdirs.items()
    }
    out = {
        "num_eigvals": len(ref),
        "eigval_rel_err_max": float(rel.max()),
        "eigval_rel_err_median": float(np.median(rel)),
        "eigval_rel_err_lambda_1": float(rel[0]),
        "lambda_1": float(ref[0]),
        "num_scored": len(ref_s),
        "spearman": float(scipy.stats.spearmanr(ref_s, low_s).statistic),
        **{f"auc_{d}": auc[d] for d in DTYPES},
    }
    for fraction in TOP_FRACTIONS:
        out[f"top{round(fraction * 100)}pct_overlap"] = top_overlap(ref_s, low_s, fraction)
    return out


def run_workload(workload: str) -> dict[str, object]:
    """Both pipelines of one workload (the second on the first's params) and their comparison."""
    base = Path(_OUT.value).resolve() / workload  # the jobs run in REPO
    workdirs = {d: base / d for d in DTYPES}
    row: dict[str, object] = {
        "workload": workload,
        "flags": config_flags(workload, "bfloat16"),
        "hvp_batch_size": hvp_batch_size(workload),
    }
    for dtype in DTYPES:
        if dtype != "float32":
            copy_trained(workdirs["float32"], workdirs[dtype])
        seconds, log = run_pipeline(workload, dtype, workdirs[dtype])
        size = basis_size(log, workdirs[dtype], dtype)
        row.update({f"wall_s_{dtype}": seconds, f"basis_mib_{dtype}": size["mib"]})
        row.update({"basis_vectors": size["vectors"], "params": size["params"]})
        print(f"{workload} {dtype}: {seconds:.1f} s, basis {size['mib']} MiB", flush=True)
    row.update(compare(workdirs))
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    """One table row per workload."""
    lines = [
        "| workload | params | n, b, p̃ | λ rel. error: max / median (λ₁) "
        "| self-influence Spearman ρ (examples) | top 1% / top 5% overlap "
        "| basis per device, f32 → bf16 | AUC f32 / bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['params']:,} "
            f"| {r['basis_vectors'] - 1}, {r['hvp_batch_size']}, {r['num_eigvals']} "
            f"| {r['eigval_rel_err_max']:.1e} / {r['eigval_rel_err_median']:.1e} "
            f"({r['eigval_rel_err_lambda_1']:.1e}) "
            f"| {r['spearman']:.6f} ({r['num_scored']:,}) "
            f"| {r['top1pct_overlap']:.3f} / {r['top5pct_overlap']:.3f} "
            f"| {r['basis_mib_float32']:.1f} → {r['basis_mib_bfloat16']:.1f} MiB "
            f"| {r['auc_float32']:.4f} / {r['auc_bfloat16']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    unknown = set(_WORKLOADS.value) - set(WORKLOADS)
    if unknown:
        raise app.UsageError(f"unknown workloads {sorted(unknown)}; choose from {list(WORKLOADS)}")
    start = time.perf_counter()
    rows = [run_workload(w) for w in _WORKLOADS.value]
    print("\n" + markdown(rows))
    print(f"\ncommand: {' '.join(['python -m benchmarks.basis_dtype', *sys.argv[1:]])}")
    print(f"wall: {time.perf_counter() - start:.0f} s")
    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "basis_dtype.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    app.run(main)
