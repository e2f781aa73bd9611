"""The benchmarks run (smoke runs on tiny settings): they print the ratios the README quotes.
Timings are never asserted here; benchmarks/ measures them."""

import re

from tests.pipeline_helpers import run_module as run


def test_speed_benchmark_prints_its_ratios() -> None:
    out = run(
        "benchmarks.speed",
        "--model=small_cnn",
        "--batch_size=64",
        "--num_iters=6",
        "--top_k=3",
        "--repeats=3",
        "--time_budget=5",
        "--score_batches=3",
    )
    for name in (
        "hvp/grad",
        "arnoldi/(n*hvp)",
        "score/forward per example",
        "arnoldi lookahead/synchronous",
        "score overlapped/synchronous",
    ):
        assert re.search(rf"^{re.escape(name)}[^=]* = [0-9.]+", out, re.M), name


def test_scoring_throughput_benchmark_prints_its_ratio() -> None:
    out = run("benchmarks.scoring_throughput", "--presets=runlocal", "--top_k=4", "--batch_size=64")
    assert re.search(r"throughput 2 processes / 1 process = [0-9.]+", out)


def test_streaming_benchmark_prints_rss_and_busy_fraction() -> None:
    out = run(
        "benchmarks.streaming",
        "--sizes=2000,4000",
        "--busy_batches=3",
        "--preset=runlocal",
    )
    assert re.search(r"^N=\s+4,000: .* examples/s, peak RSS\s+[0-9.]+ MiB", out, re.M)
    assert re.search(r"^peak RSS N=4,000 / N=2,000 = [0-9.]+", out, re.M)
    for threads in (2, 0):
        assert re.search(rf"^read_threads={threads}: .* busy fraction = [0-9.]+", out, re.M)
