"""Test-wide JAX set-up: 8 fake CPU devices and one XLA CPU thread (``tests/xla_flags.py``), both
before any JAX operation; one persistent XLA compilation cache for the job processes the tests
start; the longest files first; the MNIST runlocal params trained once per test process."""

import atexit
import os
import shutil
import tempfile

from tests import xla_flags

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if xla_flags.THREADS not in os.environ.get("XLA_FLAGS", ""):  # xdist's workers inherit it
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags.THREADS}".strip()

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)

# Dozens of job processes (subprocesses inherit this environment) compile the same small programs:
# the runlocal train job took 6.7 s cold and 2.7 s with a warm cache, arnoldi 6.2 s and 3.1 s.
# One cache for the whole run (xdist's workers inherit the first process' variable), removed when
# that process exits; of the processes of a multi-process job only process 0 writes (JAX's rule).
# The test processes use it too: the stages build their jitted programs anew for each run, so a
# run in-process recompiles what an earlier one compiled unless the cache has it
# (test_outputs, test_pipeline and test_finite: 86 s without it, 73 s with it).
_CACHE = tempfile.mkdtemp(prefix="influence-tests-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The files that take longest on 2 cores, started first (about 360, 255, 180, 180, 175, 170, 145,
# 120, 120, 90, 60 and 45 seconds of a worker's time in a run of 2026-12-07 evening with
# --durations). launch/test.sh passes --no-loadscope-reorder, so xdist's loadfile hands out files
# in this order; by default it sorts them by test count, which starts a one-test file of minutes
# last while the other worker idles.
LONGEST_FIRST = (
    "test_faults.py",
    "test_multiprocess.py",
    "test_benchmarks.py",
    "test_methods.py",
    "test_vision.py",
    "test_readme.py",
    "test_report.py",
    "test_translation.py",
    "test_lora_text.py",
    "test_preemption.py",
    "test_factorised.py",
    "test_basis_storage.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def runlocal_trained(tmp_path_factory: pytest.TempPathFactory):
    """The MNIST runlocal preset's params (``tests.pipeline_helpers.tiny_config``), trained once
    per test process: many files' tests start from them. The params' fingerprint leaves out every
    field that does not change training (``stages/blocks.py``), so a test whose config differs
    from ``tiny_config()`` only in such fields (the method, Arnoldi, scoring, the mesh) reuses
    them: it copies them into its workdir (``pipeline_helpers.copy_trained``) and the train stage
    finds them there."""
    from stages import train
    from tests.pipeline_helpers import tiny_config

    workdir = tmp_path_factory.mktemp("runlocal_trained")
    train.run(tiny_config(), workdir)
    return workdir
