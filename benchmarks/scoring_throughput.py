"""Scoring throughput with 1 process vs 2 processes (jax.distributed on 127.0.0.1), one run each.

    .venv/bin/python -m benchmarks.scoring_throughput [--model=small_cnn] [--top_k=20]

Prepares one workdir (train + fit, Arnoldi, on MNIST 5k, single process), then runs the score job on
copies of it: once as 1 process with 1 CPU device, once as 2 processes with 1 CPU device each
(launch/multiprocess.py). The score job logs its own throughput over all examples after its first
(compiling) step; the ratio of the two is printed with the machine's core count. On one machine
the processes share its cores, so this measures the fan-out's overhead and scaling on shared
hardware, not what separate hosts would give.
"""

import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

from launch import multiprocess

_MODEL = flags.DEFINE_enum("model", "small_cnn", ["small_cnn", "flax_cnn"], "MNIST model.")
_TOP_K = flags.DEFINE_integer("top_k", 20, "Eigenvectors p̃ (JVPs per example).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global scoring batch.")
_PRESETS = flags.DEFINE_string(
    "presets", "", "More presets of configs/mnist.py, e.g. runlocal for a seconds-long smoke run."
)
REPO = Path(__file__).resolve().parents[1]
RATE = re.compile(r"scoring throughput: ([0-9.]+) examples/s")


def job(name: str, workdir: Path, config: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        f"jobs.{name}",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.score.batch_size={_BATCH.value}",
        "--config.score.num_queries=0",
        *extra,
    ]


def rate(output: str) -> float:
    found = RATE.findall(output)
    if not found:
        raise RuntimeError(f"no throughput line in the score job's output:\n{output[-3000:]}")
    return float(found[-1])


def main(argv: list[str]) -> None:
    del argv
    presets = f",{_PRESETS.value}" if _PRESETS.value else ""
    config = f"configs/mnist.py:model={_MODEL.value},top_k={_TOP_K.value}{presets}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        for name in ("train", "fit"):
            subprocess.run(
                job(name, base, config), cwd=REPO, env=env, check=True, capture_output=True
            )
        rates = {}
        for processes in (1, 2):
            workdir = Path(tmp) / f"p{processes}"
            shutil.copytree(base, workdir)
            sink = io.StringIO()
            code = multiprocess.launch(
                job("score", workdir, config), processes, 1, sink=sink, cwd=REPO, timeout_secs=1800
            ).exit_code
            if code:
                raise RuntimeError(
                    f"score with {processes} processes failed:\n{sink.getvalue()[-3000:]}"
                )
            rates[processes] = rate(sink.getvalue())
            print(f"{processes} process(es) x 1 CPU device: {rates[processes]:.1f} examples/s")
    print(
        f"--- {_MODEL.value}, p̃={_TOP_K.value}, global batch {_BATCH.value}, "
        f"{os.cpu_count()} CPU cores shared by all processes ---"
    )
    print(f"throughput 2 processes / 1 process = {rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    app.run(main)
