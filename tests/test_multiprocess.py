"""Real multi-process runs: several local processes joined by jax.distributed on 127.0.0.1.

Compiling in several processes at once on 2 cores is slow, so these tests are few and share work:
one single-process reference and one 2- and one 4-process run of arnoldi + score on a dataset
whose size is not a multiple of hosts × batch.
"""

import shutil

import jax
import numpy as np
import pytest

from launch import multiprocess
from parallel import sharding, steps
from parallel.mesh import make_mesh
from pipeline import arnoldi, failpoints, score, train
from tasks import mnist
from tests.pipeline_helpers import eigvals, run_multiprocess, scores, tiny_config

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
    arnoldi.run(config, workdir)
    score.run(config, workdir)
    return workdir


@pytest.mark.parametrize("num_processes", [2, 4])
def test_processes_match_single_process(reference, tmp_path, num_processes):
    """arnoldi + score as 2 or 4 processes of 2 fake devices each (mesh data=2P x model=1,
    different HVP and scoring shards per host) reproduce the single-process eigenvalues and scores,
    and the output holds every example exactly once."""
    workdir = tmp_path / "multi"
    workdir.mkdir()
    shutil.copytree(reference / "params", workdir / "params")
    for job in ("arnoldi", "score"):
        code, output = run_multiprocess(job, workdir, num_processes, 2, *_flags(UNEVEN))
        assert code == 0, output[-3000:]
    assert f"{num_processes} processes" in output

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
    config = tiny_config(**UNEVEN)
    mesh = make_mesh(1, 1, 1)
    task = mnist.make_task(config.model)
    params_like = jax.eval_shape(task.init_params, jax.random.key(0))
    param_sh = sharding.param_shardings(params_like, mesh, config.mesh.min_shard_size)
    got, _ = train.restore_params(workdir, config, params_like, param_sh)
    want, _ = train.restore_params(reference, config, params_like, param_sh)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dead", [1, 0], ids=["worker-dies", "coordinator-dies"])
def test_survivors_stop_when_a_process_dies(reference, tmp_path, dead):
    """SIGKILL one of 2 processes at Arnoldi iteration 5: the other stops on its own with an error
    naming the cause (the launcher's 120 s grace period and 600 s limit are never reached)."""
    workdir = tmp_path / "die"
    workdir.mkdir()
    shutil.copytree(reference / "params", workdir / "params")
    code, output = run_multiprocess(
        "arnoldi",
        workdir,
        2,
        1,
        "--heartbeat_timeout_secs=10",
        *_flags(UNEVEN),
        env={failpoints.ENV: f"arnoldi_iteration=5@{dead}"},
    )
    survivor = 1 - dead
    lines = [line for line in output.splitlines() if line.startswith(f"[{survivor}]")]
    assert code != 0, output[-3000:]
    assert any("another process of the job died" in ln or "another task died" in ln for ln in lines)
    assert multiprocess.KILLED_REASON not in output


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
        init = steps.init_krylov_state(params_like, num_iters, param_sh, mesh)
        state = init(jax.random.key(0))
        measured[model] = sharding.bytes_per_device(state["krylov_basis"])
    small = sum(x.size for x in jax.tree.leaves(params_like) if x.size < 4096)  # replicated leaves
    replicated_bytes = (num_iters + 1) * small * 4
    for model in (2, 4, 8):
        ratio = (measured[model] - replicated_bytes) / (measured[1] - replicated_bytes)
        print(f"model={model}: {measured[model] / 2**20:.2f} MiB per device, ratio {ratio:.4f}")
        assert ratio == pytest.approx(1 / model, rel=1e-6)
