"""Real multi-process runs: several local processes joined by jax.distributed on 127.0.0.1.

Compiling in several processes at once on 2 cores is slow, so these tests are few and share work:
one single-process reference and one 2- and one 4-process run of arnoldi + score on a dataset
whose size is not a multiple of hosts × batch.
"""

import dataclasses
import io
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from launch import multiprocess
from parallel import programs, sharding
from parallel.mesh import make_mesh
from runtime import failpoints
from stages import artifacts, checks, fit, score, setup, train
from tasks import mnist
from tests.pipeline_helpers import (
    REPO,
    eigvals,
    launch_job,
    run_multiprocess,
    scores,
    tiny_config,
)

# End-to-end runs of the jobs: the full suite only (launch/test.sh --fast skips them).
pytestmark = pytest.mark.slow

# 250 training and 37 eval examples, parts of 60 rows, global batch 64: with 2 or 4 processes the
# last parts are ragged, the row groups get unequal numbers of parts and must be padded with masked
# steps, and neither split is a multiple of hosts × batch.
UNEVEN = {
    "data__num_train": 250,
    "data__num_eval": 37,
    "score__examples_per_shard": 60,
    "score__batch_size": 64,
}


def _flags(overrides: dict) -> list[str]:
    return [f"--config.{k.replace('__', '.')}={v}" for k, v in overrides.items()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """train + arnoldi + score in this process on one device."""
    workdir = tmp_path_factory.mktemp("single")
    config = tiny_config(**UNEVEN)
    train.run(config, workdir)
    fit.run(config, workdir)
    score.run(config, workdir)
    return workdir


# Layouts over P processes x D devices: 'data' across hosts (2 hosts as 2 slices of a hybrid mesh,
# or 4 hosts), and the pod layout, 'model' across both hosts (data=1 x model=8: both processes
# hold the same rows of every batch, one row group, and only process 0 writes).
# The two-slice layout scores under score.mode=auto (the modes agree to the tolerance below): every
# process times both modes and takes the largest times, so all choose one mode (process 0 logs
# it), with auto's compile thread running beside the distributed runtime.
LAYOUTS = {
    "2x2-two-slices": (2, 2, {"mesh__num_slices": 2, "score__mode": "auto"}),
    # Off the devices (docs/large_models.md) on 4 hosts, 'model' = 2 within each: the basis in
    # host memory, G distilled into host memory a row a sweep (a budget below one row), scored
    # from host memory in chunks of 3.
    "4x2-off-device": (
        4,
        2,
        {
            "mesh__model": 2,
            "mesh__min_shard_size": 64,
            "arnoldi__basis_storage": "host",
            "arnoldi__orthogonalization": "bcgs2",
            "arnoldi__block_rows": 4,
            "arnoldi__memory_budget_mb": 0.001,
            "score__eigvecs_storage": "host",
            "score__tangent_chunk": 3,
            "score__mode": "forward",
        },
    ),
    "2x4-model-across-hosts": (
        2,
        4,
        {"mesh__data": 1, "mesh__model": -1, "mesh__min_shard_size": 64},
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_processes_match_single_process(reference, tmp_path, layout):
    """fit (Arnoldi) + score on several processes, one launch of the pipeline job whose train
    stage finds the reference's params (different HVP and scoring shards per host, or the same
    rows on every host of a 'model' group), reproduce the single-process eigenvalues and scores,
    and the output holds every example exactly once."""
    num_processes, devices, mesh = LAYOUTS[layout]
    workdir = tmp_path / "multi"
    workdir.mkdir()
    shutil.copytree(reference / "params", workdir / "params")
    code, output = run_multiprocess(
        "pipeline", workdir, num_processes, devices, *_flags({**UNEVEN, **mesh})
    )
    assert code == 0, output[-3000:]
    assert "trained params already in" in output, output[-3000:]
    assert f"{num_processes} processes" in output
    groups = 1 if "model" in layout else num_processes
    assert f"({groups} row groups)" in output
    if layout == "4x2-off-device":
        assert "G (8 rows) distilled into host memory, 1 rows a sweep" in output, output[-3000:]
        assert "score.eigvecs_storage=host: 8 tangents in 3 chunks of 3" in output, output[-3000:]
    if mesh.get("score__mode") == "auto":
        chosen = [line.rsplit("chose ", 1)[1] for line in output.splitlines() if "; chose " in line]
        assert len(chosen) == 1 and chosen[0] in ("forward", "reverse"), output[-3000:]

    np.testing.assert_allclose(eigvals(workdir), eigvals(reference), rtol=1e-5)
    for split, size in (("train", 250), ("eval", 37)):
        got, want = scores(workdir, split), scores(reference, split)
        assert len(got) == size and got["id"].is_unique
        np.testing.assert_array_equal(got["id"], want["id"])
        np.testing.assert_array_equal(got["label"], want["label"])
        np.testing.assert_allclose(
            got["self_influence"], want["self_influence"], rtol=1e-4, atol=1e-6
        )
        # Projections are sums of mixed-sign terms; entries that cancel carry float32 round-off of
        # the terms' size, hence an atol relative to the largest entry (as in test_scoring.py).
        g_want = np.stack(want["projections"])
        np.testing.assert_allclose(
            np.stack(got["projections"]), g_want, rtol=1e-4, atol=1e-5 * np.abs(g_want).max()
        )


def test_train_two_processes_matches_single(reference, tmp_path):
    """The train job as 2 processes (data-parallel over hosts) ends at the single-process params."""
    workdir = tmp_path / "train2"
    code, output = run_multiprocess("train", workdir, 2, 1, *_flags(UNEVEN))
    assert code == 0, output[-3000:]
    ctx = setup.context(tiny_config(**UNEVEN), workdir, checks.check_train)
    got, _ = artifacts.restore_params(ctx)
    want, _ = artifacts.restore_params(dataclasses.replace(ctx, workdir=reference))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


HEARTBEAT_S = 10
# README ("What happens when…"): the survivors stop within the heartbeat timeout plus this.
SURVIVOR_SLACK_S = 30


@pytest.mark.parametrize(
    ("dead", "stall"),
    [(1, False), (0, False), (1, True)],
    ids=["worker-dies", "coordinator-dies", "worker-dies-while-coordinator-busy"],
)
def test_survivor_prints_the_line_and_exits_1(reference, tmp_path, dead, stall):
    """SIGKILL one of 2 processes at Arnoldi iteration 5: the other ends with the project's line
    (``error: process i of 2: ...``, its last line) and exit code 1, within the heartbeat timeout
    plus the README's slack, whether it was in a collective (which fails at once) or busy in host
    code (then JAX's runtime aborts it and the supervisor reports it)."""
    workdir = tmp_path / "die"
    workdir.mkdir()
    shutil.copytree(reference / "params", workdir / "params")
    survivor = 1 - dead
    points = [f"arnoldi_iteration=5@{dead}"]
    if stall:
        points.append(f"arnoldi_iteration=5@{survivor}:STALL")
    outcome, output = launch_job(
        "arnoldi",
        workdir,
        2,
        1,
        f"--heartbeat_timeout_secs={HEARTBEAT_S}",
        *_flags(UNEVEN),
        env={failpoints.ENV: ",".join(points)},
    )
    print(f"\n{outcome}")
    assert outcome.codes[dead] == -9, output[-3000:]
    assert outcome.codes[survivor] == 1, output[-3000:]
    lines = [ln.split(" ", 1)[1] for ln in output.splitlines() if ln.startswith(f"[{survivor}] ")]
    assert lines[-1].startswith(f"error: process {survivor} of 2: "), lines[-5:]
    assert "another process of the job died" in lines[-1]
    waited = outcome.ended_s[survivor] - outcome.ended_s[dead]
    assert waited <= HEARTBEAT_S + SURVIVOR_SLACK_S, waited


# A background thread that writes to stderr without pause (as Orbax's commit thread logs its
# barrier's traceback when the peer it waits for is gone) while the main thread ends with the line.
_CHATTY_THREAD = """
import os, sys, threading
sys.path.insert(0, os.getcwd())
from jobs import cli

started = threading.Event()
def chatter():
    started.set()
    while True:
        os.write(2, b"Traceback line of a background thread\\n")
threading.Thread(target=chatter, daemon=True).start()
started.wait()
cli.fail("process 1 of 2: a collective failed", code=1, at_once=True)
"""


def test_lost_peer_line_stays_last_while_other_threads_write():
    """The line a survivor exits with is its last, whatever other threads are still writing."""
    for _ in range(5):
        done = subprocess.run(
            [sys.executable, "-c", _CHATTY_THREAD], capture_output=True, text=True, cwd=REPO
        )
        assert done.returncode == 1, done.stderr[-2000:]
        assert done.stderr.splitlines()[-1] == "error: process 1 of 2: a collective failed"


_TWO_MANAGERS = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from parallel import distributed
distributed.Runtime.from_env().initialize()
from checkpoints.checkpointer import Checkpointer
mesh = Mesh(np.array(jax.devices()), ("d",))
x = jax.jit(lambda: jnp.ones((4_000_000,)), out_shardings=NamedSharding(mesh, P("d")))()
with Checkpointer(sys.argv[1] + "/state") as state:  # asynchronous, as training's
    for step in range(1, 31):
        state.save(step, {"x": x + step}, {"step": step})
        with Checkpointer(sys.argv[1] + "/kept", max_to_keep=None, async_save=False) as kept:
            kept.save(step, {"x": x}, {"step": step}, force=True)
    state.wait_until_finished()
"""


def test_two_checkpointers_save_at_once(tmp_path):
    """One Checkpointer's asynchronous save still finishing while another saves (training's state
    and the params kept after an epoch): without distinct barrier names the two processes failed
    with "Barrier ... is already ongoing" (and hung) in 2 of 4 runs of this test; 4 of 4 passed
    with them (tests/test_pieces.py checks the names themselves)."""
    sink = io.StringIO()
    outcome = multiprocess.launch(
        [sys.executable, "-c", _TWO_MANAGERS, str(tmp_path)],
        2,
        1,
        sink=sink,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO)},
        grace_secs=10,
        timeout_secs=90,
    )
    assert outcome.exit_code == 0, sink.getvalue()[-3000:]


def test_krylov_bytes_per_device_shrink_with_model_axis():
    """Bytes of the Krylov basis on the most loaded device fall as 1/(devices on 'model') for the
    large leaves of the Flax CNN (824k params; leaves under 4,096 elements stay replicated)."""
    task = mnist.make_task("flax_cnn")
    params_like = jax.eval_shape(task.init_params, jax.random.key(0))
    num_iters = 3
    measured = {}
    for model in (1, 2, 4, 8):
        mesh = make_mesh(8 // model, model, 8)
        param_sh = sharding.param_shardings(params_like, mesh, 4096)
        init = programs.jit_init_krylov_state(params_like, num_iters, param_sh, mesh)
        state = init(jax.random.key(0))
        measured[model] = sharding.bytes_per_device(state["krylov_basis"])
    small = sum(x.size for x in jax.tree.leaves(params_like) if x.size < 4096)  # replicated leaves
    replicated_bytes = (num_iters + 1) * small * 4
    for model in (2, 4, 8):
        ratio = (measured[model] - replicated_bytes) / (measured[1] - replicated_bytes)
        print(f"model={model}: {measured[model] / 2**20:.2f} MiB per device, ratio {ratio:.4f}")
        assert ratio == pytest.approx(1 / model, rel=1e-6)
