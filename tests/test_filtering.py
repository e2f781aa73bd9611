"""Data filtering (tasks/filtering.py): the kept examples are the lowest-scored ones of a
finished run (or a seeded random subset), every stage sees that subset, and bad filter input is
one line before any compute."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from checkpoints import fingerprint
from checkpoints.checkpointer import Checkpointer
from runtime import outputs
from runtime import workdir as wd
from runtime.errors import InputError
from stages import blocks
from tasks import filtering, loading
from tests.pipeline_helpers import run_job, run_module, tiny_config


def fake_scores(workdir: Path, ids: np.ndarray, values: np.ndarray, parts: int = 1) -> Path:
    """A scored workdir as jobs.score leaves it (Arnoldi's scores): meta.json and the training
    parts in order."""
    scored = wd.results(workdir, "arnoldi")
    (scored / wd.SCORES / "train").mkdir(parents=True)
    (scored / wd.SCORES_META).write_text(json.dumps({"corruption_column": "flipped"}))
    for i, (a, b) in enumerate(
        zip(np.array_split(ids, parts), np.array_split(values, parts), strict=True)
    ):
        path = scored / wd.SCORES / "train" / f"part-{i:05d}-of-{parts:05d}.parquet"
        outputs.write_parquet(path, pa.table({"id": a, "self_influence": b.astype(np.float32)}))
    return workdir


def train_ids(config, workdir: Path) -> np.ndarray:
    train = loading.load(config, workdir).splits["train"]
    return train.take(np.arange(train.num_examples))["id"]


@pytest.fixture
def scored(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    ids = train_ids(tiny_config(), tmp_path / "w")
    values = np.random.default_rng(3).standard_normal(ids.size)
    return fake_scores(tmp_path / "scored", ids, values, parts=3), ids, values


def test_keeps_the_lowest_scored_examples_in_position_order(scored, tmp_path: Path) -> None:
    directory, ids, values = scored
    config = tiny_config(filter__keep=0.25, filter__scores=str(directory))
    task = loading.load(config, tmp_path / "w")
    kept = np.sort(np.argsort(values)[: round(0.25 * ids.size)])
    np.testing.assert_array_equal(train_ids(config, tmp_path / "w"), ids[kept])
    assert task.fingerprint["filter"].startswith(f"lowest self_influence {kept.size} of {ids.size}")
    assert task.splits["eval"].num_examples == tiny_config().data.num_eval  # eval untouched


def test_random_subset_is_seeded_and_of_the_same_size(scored, tmp_path: Path) -> None:
    _, ids, _ = scored

    def random_ids(seed: int) -> np.ndarray:
        config = tiny_config(filter__keep=0.25, filter__by="random", filter__seed=seed)
        return train_ids(config, tmp_path / "w")

    first = random_ids(0)
    position = {int(i): p for p, i in enumerate(ids)}
    assert first.size == round(0.25 * ids.size)
    assert np.all(np.diff([position[int(i)] for i in first]) > 0)  # a subset, in position order
    np.testing.assert_array_equal(random_ids(0), first)
    assert not np.array_equal(random_ids(1), first)


@pytest.mark.slow
def test_filtering_benchmark_retrains_on_each_subset(tmp_path: Path) -> None:
    """benchmarks/filtering.py trains (with jobs.train) on the lowest-scored half and on a random
    half: each run records only the corrupted examples it kept, each kept set is in its params'
    fingerprint, and the report has a row per training set. An unfiltered run's fingerprint has
    no filter field (workdirs from before filtering existed stay valid)."""
    scored = tmp_path / "scored"
    assert run_job("train", scored).returncode == 0
    ids = train_ids(tiny_config(), scored)
    values = np.random.default_rng(3).standard_normal(ids.size)
    fake_scores(scored, ids, values)
    out = tmp_path / "out"
    run_module(
        "benchmarks.filtering",
        "--config=configs/mnist.py:runlocal",
        f"--scored={scored}",
        "--keep=0.5",
        f"--out={out}",
    )
    rows = json.loads((out / "filtering-seed0.json").read_text())
    assert [(r["selection"], r["keep"], r["num_train"]) for r in rows] == [
        ("all", 1.0, 256),
        ("self_influence", 0.5, 128),
        ("random", 0.5, 128),
    ]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in rows)
    kept = set(ids[np.argsort(values)[: ids.size // 2]])
    corrupted = set(pd.read_parquet(out / "self_influence-0.5" / wd.CORRUPTED)["id"])
    assert corrupted and corrupted <= kept and rows[1]["corrupted_kept"] == len(corrupted)
    filters = []
    for name in ("self_influence-0.5", "random-0.5-seed0"):
        with Checkpointer(out / name / wd.PARAMS, async_save=False) as ckpt:
            filters.append(ckpt.restore_meta(ckpt.all_steps()[-1])["fingerprint"]["task.filter"])
    assert filters[0].startswith("lowest self_influence 128 of 256")
    assert filters[1].startswith("random 128 of 256")
    config = tiny_config()
    assert not any(
        k.startswith("filter") for k in fingerprint.training(config, blocks.all_blocks())
    )


def _nan(d: Path, ids: np.ndarray, values: np.ndarray) -> Path:
    values = values.copy()
    values[7] = np.nan
    return fake_scores(d, ids, values)


BAD = {
    "keep zero": (dict(filter__keep=0.0), None, "filter.keep=0.0 must be in (0, 1]"),
    "keep above one": (dict(filter__keep=1.5), None, "filter.keep=1.5 must be in (0, 1]"),
    "no scores given": (dict(filter__keep=0.5), None, "needs filter.scores="),
    "not scored": (
        {},
        lambda d, ids, v: (wd.results(d, "arnoldi") / "scores").mkdir(parents=True) or d,
        "methods/arnoldi/scores/meta.json missing)",
    ),
    "unfinished": (
        {},
        lambda d, ids, v: (
            (
                wd.results(fake_scores(d, ids, v, 2), "arnoldi")
                / "scores/train/part-00001-of-00002.parquet"
            ).unlink()
            or d
        ),
        "scoring is unfinished (1 of 2 parts",
    ),
    "unknown column": (dict(filter__by="loss"), fake_scores, "filter.by='loss' is not a column"),
    "other size": ({}, lambda d, ids, v: fake_scores(d, ids[:-1], v[:-1]), "scored 255 training"),
    "other examples": (
        {},
        lambda d, ids, v: fake_scores(d, ids[::-1].copy(), v),
        "scored other examples: position 0",
    ),
    "non-finite": ({}, _nan, "1 non-finite self_influence values (first at id"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_filter_input_is_one_clear_error(case: str, tmp_path: Path) -> None:
    overrides, make, message = BAD[case]
    if make is not None:
        ids = train_ids(tiny_config(), tmp_path / "w")
        values = np.random.default_rng(0).standard_normal(ids.size)
        overrides = {
            "filter__keep": 0.5,
            "filter__scores": str(make(tmp_path / "scored", ids, values)),
            **overrides,
        }
    with pytest.raises(InputError) as e:
        loading.load(tiny_config(**overrides), tmp_path / "w")
    assert message in str(e.value), str(e.value)
    assert filtering.active(tiny_config(**overrides)) == (overrides.get("filter__keep", 1) < 1)


def test_bad_filter_is_a_one_line_exit_2_from_the_job(tmp_path: Path) -> None:
    done = run_job("train", tmp_path / "w", "--config.filter.keep=0.5")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: filter.keep=0.5 with")
    assert not (tmp_path / "w" / wd.PARAMS).exists()
