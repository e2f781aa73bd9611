"""The XLA flags of every process the test suite runs: its own (``tests/conftest.py`` sets them
before JAX starts) and the job processes it starts (``tests/pipeline_helpers.py``).

One XLA CPU thread per process: the suite runs 2 workers, each often beside job processes, on 2
cores, and XLA's per-process thread pools fought over them (two runlocal pipelines side by side
took 23.7 s with the pools, 21.0 s with one thread each, on this repository's 2-core machine).
"""

THREADS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
