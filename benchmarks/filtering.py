"""Data filtering by self-influence against a random subset of the same size (paper §5.2, Table 3).

    .venv/bin/python -m benchmarks.filtering --config=configs/translation.py \
        --scored=workdirs/translation --keep=0.5,0.9 --out=workdirs/filtering

``--scored`` is a finished pipeline run of the same config (``jobs.pipeline``): the configured
method's scores (``<scored>/methods/<name>/scores``) rank the training split. For each x in
``--keep``, ``jobs.train`` trains, each in its own process as a user runs it, on the x fraction
with the lowest self-influence (``filter.scores=<scored>``) and on a random x fraction
(``filter.by=random``, seeded by ``--seed``), in ``<out>/<by>-<x>[-seed<s>]/`` (reused when
already trained, so a second ``--seed`` only adds random subsets). Then, for those and for the
scored run itself (all the data), the held-out quality of the trained params: mean eval loss, the
task's metrics and corpus metrics (BLEU and chrF of greedy translations for translation), and how
many of the task's corrupted examples each training set kept. Prints one table and writes
``<out>/filtering-seed<s>.json``.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from benchmarks.configs import load_config

REPO = Path(__file__).resolve().parents[1]
_CONFIG = flags.DEFINE_string("config", "configs/translation.py", "Config file[:presets].")
_SCORED = flags.DEFINE_string("scored", None, "Workdir of a finished pipeline run of --config.")
_KEEP = flags.DEFINE_list("keep", ["0.5", "0.9"], "Fractions of the training split kept.")
_BY = flags.DEFINE_string(
    "by", "self_influence", "Score column ranking the examples (lowest kept)."
)
_OUT = flags.DEFINE_string("out", None, "Directory of the filtered runs and the JSON report.")
_SEED = flags.DEFINE_integer("seed", 0, "filter.seed of the random subsets.")


def filter_fields(keep: float, by: str) -> dict[str, object]:
    """The ``config.filter`` fields of one training set (the job's flags and the config that
    reads its params back are made from these, so they cannot differ)."""
    return {
        "keep": keep,
        "by": by,
        "scores": str(Path(_SCORED.value).resolve()),
        "seed": _SEED.value,
    }


def train_filtered(workdir: Path, fields: dict[str, object]) -> float:
    """``jobs.train`` with ``config.filter`` set to ``fields``, in a fresh process; its wall
    seconds."""
    command = [
        sys.executable,
        "-m",
        "jobs.train",
        f"--config={_CONFIG.value}",
        f"--workdir={workdir}",
        *(f"--config.filter.{k}={v}" for k, v in fields.items()),
    ]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def quality(config, workdir: Path) -> dict[str, float]:
    """Held-out quality of the params trained in ``workdir`` and the corrupted examples kept."""
    from runtime import outputs
    from runtime import workdir as wd
    from stages import checks, setup
    from stages import train as train_stage
    from stages.artifacts import restore_params

    params, ctx = restore_params(setup.context(config, workdir, checks.check_train))
    held_out = ctx.split("eval")
    result = {
        "num_train": ctx.split("train").num_examples,
        **{
            f"eval_{k}": v
            for k, v in train_stage.evaluate(
                ctx.task, params, held_out, ctx.mesh, config.train.batch_size
            ).items()
        },
    }
    if ctx.task.corpus_metrics is not None:
        result.update(ctx.task.corpus_metrics(params, held_out))
    corrupted = ctx.workdir / wd.CORRUPTED
    if ctx.task.corruption_column and corrupted.exists():
        result["corrupted_kept"] = outputs.read_parquet(corrupted).num_rows
    return result


def main(argv: list[str]) -> None:
    del argv
    if not _SCORED.value or not _OUT.value:
        raise app.UsageError("--scored and --out are required")
    out = Path(_OUT.value)
    rows = []
    base = load_config(_CONFIG.value)
    rows.append({"selection": "all", "keep": 1.0, **quality(base, Path(_SCORED.value))})
    for keep in map(float, _KEEP.value):
        for by in (_BY.value, "random"):
            seed = f"-seed{_SEED.value}" if by == "random" else ""
            workdir = out / f"{by}-{keep:g}{seed}"
            fields = filter_fields(keep, by)
            seconds = train_filtered(workdir, fields)
            config = load_config(_CONFIG.value)
            config.filter.update(fields)
            rows.append(
                {"selection": by, "keep": keep, "train_s": seconds, **quality(config, workdir)}
            )
            print(json.dumps(rows[-1]), flush=True)
    columns = [c for c in rows[0] if c not in ("selection", "keep")]
    print("\n| selection | keep | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for row in rows:
        values = [row.get(c, float("nan")) for c in columns]
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in values]
        print(f"| {row['selection']} | {row['keep']:g} | " + " | ".join(cells) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"filtering-seed{_SEED.value}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    app.run(main)
