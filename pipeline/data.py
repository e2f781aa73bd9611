"""Task data on hosts and its path onto the mesh.

Every global batch is a list of example positions; each process reads only the positions of the
rows it supplies (``sharding.local_rows``) and the rows become one global array
(``jax.make_array_from_process_local_data``). HVP batches are a deterministic function of
(seed, iteration), so a resumed, re-sharded or multi-process run draws exactly the same examples.

Scoring walks each split in fixed parts of ``examples_per_shard`` rows (one output file each, the
unit of resumption). Parts are dealt round-robin to the process row groups; each group walks its
parts in host-local batches that carry the example positions and a validity mask, and groups with
less work are padded with masked batches, so every process runs the same number of steps (none
waits forever in a collective) and every example is scored exactly once.
"""

import dataclasses
from collections.abc import Iterator

import ml_collections
import numpy as np
from jax.sharding import Mesh

from parallel import sharding
from tasks.base import ClassificationTask
from tasks.registry import task_module
from tasks.sources import Source


@dataclasses.dataclass(frozen=True)
class TaskData:
    task: ClassificationTask
    splits: dict[str, Source]  # 'train' and 'eval'


def load(config: ml_collections.ConfigDict) -> TaskData:
    """The task's model and both splits, with the configured corruption applied on read. A task
    reports bad settings or data as ``tasks.sources.DataError``; anything else it raises is a bug
    and propagates as is."""
    module = task_module(config.task)
    task = module.make_task(config.model)
    train, evaluation = module.load_splits(
        num_train=config.data.num_train,
        num_eval=config.data.num_eval,
        flip_fraction=config.data.flip_fraction,
        seed=config.seed,
        source=config.data.source,
    )
    return TaskData(task=task, splits={"train": train, "eval": evaluation})


def hvp_batch_indices(
    num_examples: int, batch_size: int, seed: int, iteration: int, fixed: bool
) -> np.ndarray:
    """The b training examples of Arnoldi iteration k (Alg. 1, line 4), drawn without replacement."""
    rng = np.random.default_rng([seed, 0 if fixed else iteration])
    return np.sort(rng.choice(num_examples, batch_size, replace=False))


def global_batch(
    task: ClassificationTask, source: Source, positions: np.ndarray, mesh: Mesh
) -> dict:
    """The model inputs of examples ``positions`` (one global batch) as arrays sharded over 'data';
    this process reads only its own rows."""
    mine = positions[sharding.local_rows(mesh, positions.size)]
    return sharding.to_global(task.model_inputs(source.take(mine)), mesh, positions.size)


@dataclasses.dataclass(frozen=True)
class Part:
    """Rows [start, stop) of a split: one output file, the unit of resumption when scoring.

    ``done`` rows from ``start`` on were scored by a preempted run and saved; scoring continues
    at ``start + done``.
    """

    split: str
    index: int
    num_parts: int
    start: int
    stop: int
    done: int = 0

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-of-{self.num_parts:05d}"


def parts(split: str, num_examples: int, examples_per_shard: int) -> list[Part]:
    count = -(-num_examples // examples_per_shard)
    return [
        Part(
            split, i, count, i * examples_per_shard, min((i + 1) * examples_per_shard, num_examples)
        )
        for i in range(count)
    ]


@dataclasses.dataclass(frozen=True)
class LocalBatch:
    """This process' rows of one scoring step.

    ``part`` is None for a padding step (all rows masked); otherwise ``positions`` are rows of
    ``part.split`` (the tail padded by repeating the part's first row, a valid input) and
    ``mask`` marks the real ones; ``last`` is set on the part's final batch.
    """

    part: Part | None
    positions: np.ndarray
    mask: np.ndarray
    last: bool


def padded_batches(
    start: int, stop: int, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, mask) of full-size batches over rows [start, stop): the last batch is padded
    by repeating row ``start`` (a valid input, so a padded forward pass is well defined) and the
    mask marks the real rows."""
    for first in range(start, stop, batch_size):
        rows = np.arange(first, min(first + batch_size, stop))
        mask = np.arange(batch_size) < rows.size
        yield np.concatenate([rows, np.full(batch_size - rows.size, start)]), mask


def _part_batches(part: Part, batch_size: int) -> Iterator[LocalBatch]:
    batches = padded_batches(part.start + part.done, part.stop, batch_size)
    for i, (positions, mask) in enumerate(batches, start=1):
        last = part.start + part.done + i * batch_size >= part.stop
        yield LocalBatch(part, positions, mask, last=last)


def scoring_plan(
    remaining: list[Part], num_groups: int, group: int, local_batch_size: int
) -> list[LocalBatch]:
    """This row group's batches, padded to the step count of the busiest group.

    Part i of ``remaining`` goes to group i mod ``num_groups``; every process computes the same
    assignment from the same ``remaining`` list, so the step counts agree without communication.
    """
    steps = [0] * num_groups
    mine: list[LocalBatch] = []
    for i, part in enumerate(remaining):
        owner = i % num_groups
        steps[owner] += -(-(part.stop - part.start - part.done) // local_batch_size)
        if owner == group:
            mine.extend(_part_batches(part, local_batch_size))
    padding = LocalBatch(
        None, np.zeros(local_batch_size, np.int64), np.zeros(local_batch_size, bool), False
    )
    return mine + [padding] * (max(steps, default=0) - len(mine))
