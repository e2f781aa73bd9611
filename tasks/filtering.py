"""Data filtering (paper §5.2, Table 3): train on the fraction of the training split that a finished
run ranks cleanest, or on a random subset of the same size (the control).

    --config.filter.keep=0.9 --config.filter.scores=workdirs/translation   # lowest self-influence
    --config.filter.keep=0.9 --config.filter.by=random                      # the control

``filter.scores`` is a workdir whose ``jobs.score`` finished, with the configured method (its
``methods/<name>/scores``), on the same training split (same
examples at the same positions: checked on the ids); the ``filter.keep`` fraction of examples with
the lowest ``filter.by`` value (a score column, default ``self_influence``: high self-influence
marks likely mislabeled or noisy pairs) is kept, in position order. ``filter.by=random`` keeps a
seeded (``filter.seed``) random subset of the same size instead and needs no scores.

``tasks.loading.load`` applies the filter, so every stage of the new workdir (train, Arnoldi, scoring,
evaluate) sees the same subset; example ids stay those of the full split. What was kept enters the
params' fingerprint as the digest of the kept positions (the ``filter`` block itself does not: a
copied or moved scored workdir gives the same params, and a run without filtering keeps the
fingerprint it always had). What a task derives from its whole training split before the filter
(a tokenizer trained on all the training text) is unchanged by it.

Memory: the ranking column and the kept positions, O(N) on each host (12 bytes per example: about
1.2 GB at 10^8); the subset is a ``tasks.sources.MappedSource`` view, nothing is copied.
"""

import dataclasses

import ml_collections
import numpy as np
import pyarrow.parquet as pq
from etils import epath

from checkpoints import fingerprint
from runtime import outputs, workdir
from runtime.errors import InputError
from tasks.base import Task
from tasks.sources import MappedSource, Source

RANDOM = "random"
ID_CHECKS = 256  # positions whose ids are compared between the scores and the split


def active(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config`` filters (a config built without ``configs/common.py`` may lack the block)."""
    return "filter" in config and config.filter.keep < 1.0


def check_config(config: ml_collections.ConfigDict) -> None:
    """The filter settings, before any data is read."""
    if "filter" not in config:
        return
    f = config.filter
    if not 0.0 < f.keep <= 1.0:
        raise InputError(
            f"filter.keep={f.keep} must be in (0, 1]: the fraction of training examples kept "
            "(1 = no filtering)"
        )
    if active(config) and f.by != RANDOM and not f.scores:
        raise InputError(
            f"filter.keep={f.keep} with filter.by={f.by!r} needs filter.scores=<a workdir whose "
            "jobs.score finished>, or filter.by=random for the random control"
        )


def apply(config: ml_collections.ConfigDict, task: Task) -> Task:
    """``task`` with its training split restricted to the kept examples (itself when inactive)."""
    if not active(config):
        return task
    f, train = config.filter, task.splits["train"]
    n = train.num_examples
    k = round(f.keep * n)
    if k < 1:
        raise InputError(f"filter.keep={f.keep} keeps no example of the {n}; raise it")
    if f.by == RANDOM:
        kept = random_subset(n, k, f.seed)
        how = f"random {k} of {n} (filter.seed={f.seed})"
    else:
        scored = workdir.results(f.scores, config.method.name)
        ranking = read_ranking(scored, f.by, train, f.scores)
        kept = np.sort(np.argsort(ranking, kind="stable")[:k])
        how = f"lowest {f.by} {k} of {n}"
    digest = fingerprint.content(kept.astype(np.int64).tobytes())
    return dataclasses.replace(
        task,
        splits={**task.splits, "train": MappedSource(train, kept)},
        fingerprint={**task.fingerprint, "filter": f"{how} ({digest})"},
    )


def random_subset(n: int, k: int, seed: int) -> np.ndarray:
    """The positions ``filter.by=random`` keeps: ``k`` of ``n``, drawn from (seed, n), sorted."""
    return np.sort(np.random.default_rng([seed, n]).choice(n, k, replace=False))


def read_ranking(
    scored: epath.Path, column: str, train: Source, given: str | None = None
) -> np.ndarray:
    """Column ``column`` of the training scores in ``scored`` (a method's results directory, the
    configured method's in the workdir ``given``), one value per position of ``train``,
    after checking the scores are complete, finite and of the same examples."""
    where = f"filter.scores={given or scored}"
    scores_dir = scored / workdir.SCORES / "train"
    if not (scored / workdir.SCORES_META).exists():
        raise InputError(
            f"{where} has no scores ({scored / workdir.SCORES_META} missing); run `python -m jobs.score` there "
            "first, or give the workdir of a finished run"
        )
    files = sorted(scores_dir.glob("part-*.parquet"))
    expected = int(files[0].stem.rsplit("-of-", 1)[1]) if files else -1
    if len(files) != expected:
        raise InputError(
            f"{where}: scoring is unfinished ({len(files)} of {max(expected, 0) or '?'} parts in "
            f"{scores_dir}); finish `python -m jobs.score` there first"
        )
    with files[0].open("rb") as f:
        names = pq.read_schema(f).names
    if column not in names:
        choices = [c for c in names if c not in ("id", "projections")]
        raise InputError(
            f"filter.by={column!r} is not a column of the scores in {scores_dir}; choose one of "
            f"{choices} or 'random'"
        )
    table = outputs.read_parquet_dir(scores_dir, ["id", column])
    if table.num_rows != train.num_examples:
        raise InputError(
            f"{where} scored {table.num_rows} training examples, this config's training split has "
            f"{train.num_examples}; filter with the data config the scores were computed on"
        )
    ids = table.column("id").to_numpy()
    sample = np.unique(np.linspace(0, ids.size - 1, min(ID_CHECKS, ids.size)).astype(np.int64))
    mine = np.asarray(train.take(sample)["id"])
    if not np.array_equal(mine, ids[sample]):
        p = int(sample[np.argmax(mine != ids[sample])])
        raise InputError(
            f"{where} scored other examples: position {p} is id {int(ids[p])} there but id "
            f"{int(mine[sample == p][0])} here; use the data config and seed the scores were "
            "computed on"
        )
    values = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise InputError(
            f"{where}: {int(bad.sum())} non-finite {column} values (first at id "
            f"{int(ids[np.argmax(bad)])}); rescore that workdir before filtering by it"
        )
    return values
