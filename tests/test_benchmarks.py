"""The benchmarks run (smoke runs on tiny settings): they print the ratios the README quotes.
Timings are never asserted here; benchmarks/ measures them."""

import re

import pytest

from tests.pipeline_helpers import run_module as run

# End-to-end runs of the jobs: the full suite only (launch/test.sh --fast skips them).
pytestmark = pytest.mark.slow


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
        "arnoldi/(n*hvp), direct",
        "max|QᵀQ - I|",
        "score/forward per example",
        "arnoldi lookahead/synchronous",
        "score overlapped/synchronous",
    ):
        assert re.search(rf"^{re.escape(name)}[^=]* = [0-9.]+", out, re.M), name


def test_scoring_throughput_benchmark_prints_its_ratio() -> None:
    out = run("benchmarks.scoring_throughput", "--presets=runlocal", "--top_k=4", "--batch_size=64")
    assert re.search(r"throughput 2 processes / 1 process = [0-9.]+", out)


def test_scoring_modes_benchmark_prints_auto_ratio() -> None:
    out = run(
        "benchmarks.scoring_modes",
        "--model=small_cnn",
        "--num_examples=128",
        "--batch_size=32",
        "--top_k=3,12",
    )
    for top_k in (3, 12):
        assert re.search(rf"^p̃={top_k}: forward .* auto / (forward|reverse) = [0-9.]+$", out, re.M)


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


def test_vision_benchmark_prints_memory_ratios_and_times() -> None:
    """[memory] on a small preset (its ratios, and the allocated cross-check) and [time]."""
    out = run(
        "benchmarks.vision",
        "--sections=memory,time",
        "--memory_models=resnet_small",
        "--memory_iters=20",
        "--check_model=resnet_tiny",
        "--time_models=vit_tiny",
        "--batch_size=8",
        "--time_iters=2",
    )
    assert re.search(r"^  resnet_small: [0-9,]+ params", out, re.M)
    assert len(re.findall(r"k=8: .* ratio to 1 device [0-9.]+ .* k x ratio = [0-9.]+", out)) == 1
    assert len(re.findall(r"^  check resnet_tiny, n=4, k=\d: allocated", out, re.M)) == 2
    assert re.search(r"^  vit_tiny +[0-9,]+ params, 28px: +[0-9.]+ s/iteration", out, re.M)


def test_krylov_saves_benchmark_prints_its_ratios() -> None:
    out = run("benchmarks.krylov_saves", "--params=100000", "--num_iters=9", "--checkpoint_every=2")
    assert re.search(r"^piece bytes, last regular save / first = [0-9.]+", out, re.M)
    assert re.search(r"^whole-state bytes / piece bytes at k = 9: [0-9.]+", out, re.M)
    assert re.search(r"piece 12 GB = [0-9]+ s, whole state 241 GB = [0-9]+ s per save", out)


def test_basis_storage_benchmark_runs_under_its_cap() -> None:
    """The capped run on a tiny basis: three children (device uncapped, disk capped twice), the
    top Ritz values of the synthetic diagonal HVP found, the capped and uncapped runs equal."""
    out = run(
        "benchmarks.basis_storage",
        "--part=cap",
        "--params=300000",
        "--check_params=200000",
        "--num_iters=12",
        "--cap_gb=4",
        "--block_rows=4",
    )
    diff = re.search(r"top-10 λ max rel\. diff\. ([0-9.e+-]+)", out)
    assert diff and float(diff.group(1)) <= 1e-6, out[-2000:]
    assert re.search(r"^\| disk, capped \| 300,000 \|", out, re.M), out[-2000:]


def test_eigvecs_storage_benchmark_prints_its_ratio() -> None:
    """Forward mode with G in host memory (chunks of 3 of 8 tangents, the last padded) projects
    as with G on the devices."""
    out = run(
        "benchmarks.eigvecs_storage",
        "--top_k=8",
        "--batch_size=32",
        "--num_batches=2",
        "--chunk=3",
    )
    host = re.search(r"^\| host \| [0-9.]+ \| [0-9.]+ \| ([0-9.e+-]+) \|", out, re.M)
    assert host and float(host.group(1)) <= 1e-6, out[-2000:]
