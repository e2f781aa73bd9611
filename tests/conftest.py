"""Test-wide JAX set-up: 8 fake CPU devices (must happen before any JAX operation), and one
persistent XLA compilation cache for the job processes the tests start."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)

# Dozens of job processes (subprocesses inherit this environment) compile the same small programs:
# the runlocal train job took 6.7 s cold and 2.7 s with a warm cache, arnoldi 6.2 s and 3.1 s.
# One cache per pytest process, removed at its exit: its jobs run one after another, and of the
# processes of a multi-process job only process 0 writes (JAX's rule). This process's own jax was
# imported above, before the variable was set, so it keeps its in-memory cache only.
_CACHE = tempfile.mkdtemp(prefix="influence-tests-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The files that take longest on 2 cores, started first (about 9, 9, 8, 7, 6, 5, 5, 4 and 4
# minutes of a worker's time in a run of 2026-12-07 with --durations). launch/test.sh passes
# --no-loadscope-reorder, so xdist's loadfile hands out files in this order; by default it sorts
# them by test count, which started the one-test README file last while the other worker idled.
LONGEST_FIRST = (
    "test_readme.py",
    "test_methods.py",
    "test_faults.py",
    "test_multiprocess.py",
    "test_vision.py",
    "test_benchmarks.py",
    "test_translation.py",
    "test_lora_text.py",
    "test_report.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
