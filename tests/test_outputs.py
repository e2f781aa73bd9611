"""What the score and evaluate jobs write is what it claims to be, recomputed independently:
the projections stored for an example id are the projector run on that example, the traced
proponents/opponents are a direct top-k over all rows, the metrics are scikit-learn's; and a
resumed run redoes no finished work (counted, not inferred from equal results)."""

import json
import shutil
from pathlib import Path

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as sk

from influence import scoring
from parallel import programs
from scoring import parts
from stages import artifacts, checks, evaluate, fit, score, train
from stages.setup import context
from tasks.sources import read_all
from tests.pipeline_helpers import copy_trained, eigvals, results, scores, tiny_config
from tests.pipeline_helpers import steps as saved_steps

# End-to-end runs of the jobs: the full suite only (launch/test.sh --fast skips them).
pytestmark = pytest.mark.slow

# Parts of 48 rows in batches of 16 (256 train rows: 6 parts, the last ragged), with the tail
# (σ = l2 + damping): its columns are checked beside the plain ones.
CONFIG = {
    "score__batch_size": 16,
    "score__examples_per_shard": 48,
    "distill__tail": "damping",
    "distill__damping": 0.01,
}
SIGMA = 1e-3 + 0.01  # the runlocal preset's l2 + the damping


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, runlocal_trained: Path) -> Path:
    """train → arnoldi → score → evaluate on the tiny config (shared; copy before mutating); the
    train stage finds the session's trained params."""
    workdir = copy_trained(runlocal_trained, tmp_path_factory.mktemp("finished"))
    config = tiny_config(**CONFIG)
    for stage in (train.run, fit.run, score.run, evaluate.run):
        stage(config, workdir)
    return workdir


def test_outputs_hold_every_example_once(finished: Path) -> None:
    """Eigenvalues, Parquet scores (each example once, with its label and flipped flag), the
    corrupted-example record, the traced queries, metrics and plots; running arnoldi and score again
    reuses everything and rewrites nothing."""
    config = tiny_config(**CONFIG)
    train_scores = pd.read_parquet(results(finished) / "scores" / "train")
    assert len(train_scores) == config.data.num_train and train_scores["id"].is_unique
    assert train_scores["flipped"].sum() == round(0.2 * config.data.num_train)
    flips = pd.read_parquet(finished / "corrupted.parquet")
    assert set(flips["id"]) == set(train_scores["id"][train_scores["flipped"]])
    assert (flips["clean_label"] != flips["label"]).all()
    g = np.stack(train_scores["projections"].to_numpy())
    assert g.shape == (config.data.num_train, config.distill.top_k)
    λ = eigvals(finished) + config.distill.damping
    np.testing.assert_allclose(train_scores["self_influence"], (g**2 / λ).sum(1), rtol=1e-5)
    sqnorm = train_scores["grad_sqnorm"].to_numpy()
    np.testing.assert_allclose(
        train_scores["self_influence_tail"],
        (g**2 / λ).sum(1) + (sqnorm - (g**2).sum(1)) / SIGMA,
        rtol=1e-5,
    )
    assert json.loads((results(finished) / "scores" / "meta.json").read_text())["tail_sigma"] == (
        pytest.approx(SIGMA)
    )
    assert len(pd.read_parquet(results(finished) / "scores" / "eval")) == config.data.num_eval
    topk = pd.read_parquet(results(finished) / "scores" / score.TOPK_FILE)
    assert set(topk["train_id"]) <= set(train_scores["id"])
    for png in ("roc_pr.png", "spectrum.png"):
        assert (results(finished) / png).read_bytes()[:4] == b"\x89PNG"

    before = {p: p.stat().st_mtime_ns for p in (results(finished) / "scores").rglob("*.parquet")}
    fit.run(config, finished)
    score.run(config, finished)
    assert before == {
        p: p.stat().st_mtime_ns for p in (results(finished) / "scores").rglob("*.parquet")
    }


def test_stored_projections_are_the_projector_on_that_example(finished: Path) -> None:
    """For 20 random training ids and 10 eval ids, the stored row (projections, label, flipped,
    and the tail's ‖∇ℓ(x)‖² and ⟨∇ℓ(x), ∇ℓ(z_j)⟩ for the queries z_j) equals the projector and
    explicit gradients run directly, unsharded and unjitted, on the example with that id read
    from the source; a row/id misalignment anywhere in scoring or writing fails here."""
    config = tiny_config(**CONFIG)
    ctx = context(config, finished, checks.check_score)
    params, ctx = artifacts.restore_params(ctx)
    eig_state, _ = artifacts.restore_fitted(ctx)
    project = scoring.make_forward_products(ctx.task.per_example_loss)
    loss = ctx.task.per_example_loss

    def flat_grads(batch: dict) -> np.ndarray:
        def one(image, label):
            tree = jax.grad(lambda p: loss(p, {"image": image[None], "label": label[None]})[0])
            return jax.flatten_util.ravel_pytree(tree(params))[0]

        return np.asarray(jax.vmap(one)(batch["image"], batch["label"]), np.float64)

    eval_source = read_all(ctx.split("eval"))
    queries = {
        k: jnp.asarray(v[: config.score.num_queries])
        for k, v in ctx.task.model_inputs(eval_source).items()
    }
    query_grads = flat_grads(queries)
    rng = np.random.default_rng(20261201)
    for split, count in (("train", 20), ("eval", 10)):
        stored = scores(finished, split).set_index("id")
        source = read_all(ctx.split(split))
        position_of = {int(i): p for p, i in enumerate(source["id"])}
        ids = rng.choice(stored.index.to_numpy(), count, replace=False)
        positions = np.asarray([position_of[int(i)] for i in ids])
        batch = {
            k: jnp.asarray(v)
            for k, v in ctx.task.model_inputs({k: v[positions] for k, v in source.items()}).items()
        }
        with jax.disable_jit():
            want = np.asarray(project(params, eig_state["eigvecs"], batch))
        got = np.stack(stored.loc[ids, "projections"].to_numpy())
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        grads = flat_grads(batch)
        np.testing.assert_allclose(stored.loc[ids, "grad_sqnorm"], (grads**2).sum(1), rtol=1e-4)
        dots = np.stack(stored.loc[ids, "query_dots"].to_numpy())
        want_dots = grads @ query_grads.T
        np.testing.assert_allclose(dots, want_dots, rtol=1e-4, atol=1e-5 * np.abs(want_dots).max())
        np.testing.assert_array_equal(stored.loc[ids, "label"], source["label"][positions])
        np.testing.assert_array_equal(stored.loc[ids, "flipped"], source["flipped"][positions])


def test_query_tracing_is_a_direct_top_k(finished: Path) -> None:
    """influence_topk.parquet, merged part by part while streaming, equals the top-k of the full
    (train x query) tail-corrected influence matrix computed at once from every stored row (the
    plain influence of the same pairs beside it)."""
    config = tiny_config(**CONFIG)
    λ = eigvals(finished) + config.distill.damping
    train_rows = pd.read_parquet(results(finished) / "scores" / "train")
    queries = pd.read_parquet(results(finished) / "scores" / "eval").iloc[
        : config.score.num_queries
    ]
    g_train = np.stack(train_rows["projections"].to_numpy()).astype(np.float64)
    g_query = np.stack(queries["projections"].to_numpy()).astype(np.float64)
    plain = (g_train / λ) @ g_query.T  # (train, query): Alg. 1, line 26
    dots = np.stack(train_rows["query_dots"].to_numpy()).astype(np.float64)
    influence = plain + (dots - g_train @ g_query.T) / SIGMA
    topk = pd.read_parquet(results(finished) / "scores" / score.TOPK_FILE)
    k = config.score.top_k
    assert len(topk) == 2 * len(queries) * k
    for q, query_id in enumerate(queries["id"]):
        for kind, order in (
            ("proponent", np.argsort(-influence[:, q])),
            ("opponent", np.argsort(influence[:, q])),
        ):
            traced = topk[(topk.query_id == query_id) & (topk.kind == kind)].sort_values("rank")
            np.testing.assert_array_equal(
                traced["train_id"], train_rows["id"].to_numpy()[order[:k]]
            )
            np.testing.assert_allclose(traced["influence_tail"], influence[order[:k], q], rtol=1e-4)
            np.testing.assert_allclose(traced["influence"], plain[order[:k], q], rtol=1e-4)


def test_metrics_are_scikit_learns(finished: Path) -> None:
    """metrics.json against scikit-learn's AUC/AP on the stored self-influence and flipped flags,
    and recall at x% counted directly."""
    saved = json.loads((results(finished) / "metrics.json").read_text())
    rows = scores(finished, "train")
    flipped, self_influence = rows["flipped"].to_numpy(), rows["self_influence"].to_numpy()
    assert saved["auc"] == pytest.approx(sk.roc_auc_score(flipped, self_influence), abs=1e-12)
    assert saved["ap"] == pytest.approx(
        sk.average_precision_score(flipped, self_influence), abs=1e-12
    )
    ranked = flipped[np.argsort(-self_influence, kind="stable")]
    for pct in (5, 10, 20, 30):
        top = ranked[: round(pct / 100 * len(ranked))]
        assert saved[f"recall_at_{pct}pct"] == pytest.approx(top.sum() / flipped.sum())
    assert saved["num_flipped"] == flipped.sum() == round(0.2 * len(rows))
    tail = rows["self_influence_tail"].to_numpy()
    assert saved["auc_tail"] == pytest.approx(sk.roc_auc_score(flipped, tail), abs=1e-12)
    assert saved["ap_tail"] == pytest.approx(sk.average_precision_score(flipped, tail), abs=1e-12)


def test_resumed_arnoldi_runs_only_the_missing_iterations(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the Krylov pieces up to iteration 8 (of 12) on disk, the job runs exactly 4 Arnoldi steps
    (counted at the jitted step) and ends with the uninterrupted eigenvalues."""
    workdir = tmp_path / "w"
    for name in ("params", "methods/arnoldi/krylov"):
        shutil.copytree(finished / name, workdir / name)
    krylov = results(workdir) / "krylov"
    assert saved_steps(krylov) == [4, 8, 12]
    shutil.rmtree(krylov / "12")
    calls = []
    make_step = programs.jit_arnoldi_step

    def counting_step(*args, **kwargs):
        step = make_step(*args, **kwargs)

        def counted(state, params, batch, k):
            calls.append(int(k))
            return step(state, params, batch, k)

        return counted

    monkeypatch.setattr(programs, "jit_arnoldi_step", counting_step)
    fit.run(tiny_config(**CONFIG), workdir)
    assert calls == [8, 9, 10, 11]
    np.testing.assert_array_equal(eigvals(workdir), eigvals(finished))


def test_resumed_scoring_scores_only_the_unfinished_rows(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of 6 train parts, part 2 is missing and part 4 has 16 of its 48 rows saved by a preempted
    run: the resumed job scores exactly 48 + 32 rows (counted at the writer) and the output is
    the uninterrupted one, bit for bit."""
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    shutil.rmtree(results(workdir) / "scores" / "eval")
    (results(workdir) / "scores" / score.TOPK_FILE).unlink()
    train_dir = results(workdir) / "scores" / "train"
    (train_dir / "part-00002-of-00006.parquet").unlink()
    part4 = train_dir / "part-00004-of-00006.parquet"
    head = pd.read_parquet(part4).iloc[:16]
    head.to_parquet(train_dir / "_partial.part-00004-of-00006.parquet", index=False)
    part4.unlink()
    added = []
    original_add = parts.PartWriter.add

    def counting_add(self, part, columns, g):
        added.append((part.split, len(g)))
        return original_add(self, part, columns, g)

    monkeypatch.setattr(parts.PartWriter, "add", counting_add)
    score.run(tiny_config(**CONFIG), workdir)
    per_split = {s: sum(n for split, n in added if split == s) for s in ("train", "eval")}
    assert per_split == {"train": 48 + 32, "eval": 64}
    for split in ("train", "eval"):
        got, want = scores(workdir, split), scores(finished, split)
        pd.testing.assert_frame_equal(got, want)
    assert not list(train_dir.glob("_partial*"))


def test_tensorboard_reads_the_scalars(finished: Path, runlocal_trained: Path) -> None:
    """The events files written without TensorFlow are TensorBoard's: its own loader reads every
    loop's scalars back, at the steps they were logged (training's where the params were
    trained)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for where, loop, tag in (
        (results(finished), "arnoldi", "arnoldi/residual_norm"),
        (runlocal_trained, "train", "train/loss"),
    ):
        events = EventAccumulator(str(where / "tensorboard" / loop))
        events.Reload()
        assert tag in events.Tags()["scalars"], events.Tags()
        points = events.Scalars(tag)
        assert points and np.isfinite([p.value for p in points]).all()
    events = EventAccumulator(str(results(finished) / "tensorboard" / "evaluate"))
    events.Reload()
    (auc,) = events.Scalars("evaluate/auc")
    assert auc.value == pytest.approx(
        json.loads((results(finished) / "metrics.json").read_text())["auc"]
    )
