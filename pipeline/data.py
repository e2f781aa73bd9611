"""Task data on hosts and its path onto the mesh.

HVP batches are a deterministic function of (seed, iteration): a resumed, re-sharded or
multi-process run draws exactly the same examples. Scoring walks a split in fixed parts of
``examples_per_shard`` rows; each global batch is padded to full size and carries the example ids
and a validity mask, so every example is scored exactly once whatever the batch size.
"""

import dataclasses
from collections.abc import Iterator

import ml_collections
import numpy as np
from jax.sharding import Mesh

from parallel import sharding
from pipeline.errors import InputError
from tasks.base import ClassificationTask, Split
from tasks.registry import task_module


@dataclasses.dataclass(frozen=True)
class TaskData:
    task: ClassificationTask
    splits: dict[str, Split]  # 'train' and 'eval'


def load(config: ml_collections.ConfigDict) -> TaskData:
    """The task's model and both splits, with the configured corruption applied."""
    try:
        module = task_module(config.task)
        task = module.make_task(config.model)
        train, evaluation = module.load_splits(
            num_train=config.data.num_train,
            num_eval=config.data.num_eval,
            flip_fraction=config.data.flip_fraction,
            seed=config.seed,
            source=config.data.source,
        )
    except ValueError as e:
        raise InputError(str(e)) from e
    return TaskData(task=task, splits={"train": train, "eval": evaluation})


def hvp_batch_indices(
    num_examples: int, batch_size: int, seed: int, iteration: int, fixed: bool
) -> np.ndarray:
    """The b training examples of Arnoldi iteration k (Alg. 1, line 4), drawn without replacement."""
    rng = np.random.default_rng([seed, 0 if fixed else iteration])
    return np.sort(rng.choice(num_examples, batch_size, replace=False))


def global_batch(inputs: dict[str, np.ndarray], indices: np.ndarray, mesh: Mesh) -> dict:
    """Rows ``indices`` of ``inputs`` as global arrays; each process supplies its own block."""
    mine = indices[sharding.process_rows(indices.size)]
    return sharding.to_global({k: v[mine] for k, v in inputs.items()}, mesh)


@dataclasses.dataclass(frozen=True)
class Part:
    """Rows [start, stop) of a split: one output file, the unit of resumption when scoring."""

    index: int
    num_parts: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-of-{self.num_parts:05d}"


def parts(num_examples: int, examples_per_shard: int) -> list[Part]:
    count = -(-num_examples // examples_per_shard)
    return [
        Part(i, count, i * examples_per_shard, min((i + 1) * examples_per_shard, num_examples))
        for i in range(count)
    ]


def part_batches(
    inputs: dict[str, np.ndarray], part: Part, batch_size: int
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]]:
    """Full-size batches over the part's rows: (inputs, row positions, valid mask), padded by
    repeating the part's first row (a valid input, so the padded forward pass is well defined)."""
    for start in range(part.start, part.stop, batch_size):
        rows = np.arange(start, min(start + batch_size, part.stop))
        mask = np.zeros(batch_size, bool)
        mask[: rows.size] = True
        padded = np.concatenate([rows, np.full(batch_size - rows.size, part.start)])
        yield {k: v[padded] for k, v in inputs.items()}, padded, mask
