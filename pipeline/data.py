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
from etils import epath
from jax.sharding import Mesh

from parallel import sharding
from pipeline import filtering
from tasks.base import Task
from tasks.registry import task_module
from tasks.sources import DataError, Source


def load(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> Task:
    """The task named by ``config.task`` (``tasks/base.py``), with both splits, its training split
    restricted by ``config.filter`` (``pipeline/filtering.py``). A task reports bad settings or
    data as ``tasks.sources.DataError``; anything else it raises is a bug and propagates as is."""
    filtering.check_config(config)
    task = task_module(config.task).get_task(config, epath.Path(workdir))
    if not isinstance(task, Task):
        raise DataError(
            f"config.task={config.task!r}: get_task returned {type(task).__name__}, not a "
            "tasks.base.Task"
        )
    missing = {"train", "eval"} - set(task.splits)
    if missing:
        raise DataError(
            f"config.task={config.task!r}: get_task's splits lack {sorted(missing)} (it gave "
            f"{sorted(task.splits)}); give 'train' and 'eval' sources (eval may be empty)"
        )
    if task.state and task.train_loss is None:
        raise DataError(
            f"config.task={config.task!r}: the task marks state leaves ({task.state!r}) but gives "
            "no train_loss to update them; give Task.train_loss or drop Task.state"
        )
    train = task.splits["train"]
    if train.num_examples < 1:
        raise DataError(f"config.task={config.task!r}: the training split is empty")
    need = {"id", *task.output_columns(), *task.input_columns, *task.ground_truth_columns}
    absent = need - set(train.take(np.arange(1)))
    if absent:
        raise DataError(
            f"config.task={config.task!r}: training examples lack the columns {sorted(absent)} "
            "that the task names (input, record, corruption and ground-truth columns, and 'id')"
        )
    return filtering.apply(config, task)


def hvp_batch_indices(
    num_examples: int, batch_size: int, seed: int, iteration: int, fixed: bool
) -> np.ndarray:
    """The b training examples of Arnoldi iteration k (Alg. 1, line 4), drawn without replacement."""
    rng = np.random.default_rng([seed, 0 if fixed else iteration])
    return np.sort(rng.choice(num_examples, batch_size, replace=False))


def global_batch(
    task: Task,
    source: Source,
    positions: np.ndarray,
    mesh: Mesh,
    augment_seeds: np.ndarray | None = None,
) -> dict:
    """The model inputs of examples ``positions`` (one global batch) as arrays sharded over 'data';
    this process reads only its own rows. With ``augment_seeds`` (one per position; the train job
    only) the rows pass through ``task.augment`` first."""
    rows = sharding.local_rows(mesh, positions.size)
    columns = source.take(positions[rows])
    if augment_seeds is not None:
        columns = task.augment(columns, augment_seeds[rows])
    return sharding.to_global(task.model_inputs(columns), mesh, positions.size)


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


@dataclasses.dataclass(frozen=True)
class ScoringPlan:
    """One row group's scoring steps, each computed when asked for (memory flat in N: a plan for
    10^8 examples holds its parts, not its batches).

    Part i of the remaining parts goes to group i mod ``num_groups``; every process computes the
    same assignment from the same list, so the step counts agree without communication. Step s
    of the group is a batch of its parts in order; steps past the group's own are padding (all
    rows masked), up to the step count of the busiest group, so no process waits forever in a
    collective.
    """

    parts: tuple[Part, ...]  # this group's parts
    starts: np.ndarray  # (len(parts) + 1,) first step of each part; starts[-1] = own steps
    num_steps: int
    batch_size: int

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> LocalBatch:
        if not 0 <= step < self.num_steps:
            raise IndexError(step)
        b = self.batch_size
        if step >= self.starts[-1]:
            return LocalBatch(None, np.zeros(b, np.int64), np.zeros(b, bool), False)
        i = int(np.searchsorted(self.starts, step, side="right")) - 1
        part = self.parts[i]
        first = part.start + part.done + (step - int(self.starts[i])) * b
        rows = np.arange(first, min(first + b, part.stop))
        positions = np.concatenate([rows, np.full(b - rows.size, part.start)])
        return LocalBatch(part, positions, np.arange(b) < rows.size, last=first + b >= part.stop)

    def __iter__(self) -> Iterator[LocalBatch]:
        return (self[s] for s in range(self.num_steps))


def scoring_plan(
    remaining: list[Part], num_groups: int, group: int, local_batch_size: int
) -> ScoringPlan:
    """This row group's ``ScoringPlan`` over the ``remaining`` parts."""
    steps = [-(-(p.stop - p.start - p.done) // local_batch_size) for p in remaining]
    per_group = [sum(steps[g::num_groups]) for g in range(num_groups)]
    mine = tuple(remaining[group::num_groups])
    starts = np.concatenate([[0], np.cumsum(steps[group::num_groups], dtype=np.int64)])
    return ScoringPlan(mine, starts, max(per_group, default=0), local_batch_size)
