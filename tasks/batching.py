"""Task data on hosts and its path onto the mesh.

Every global batch is a list of example positions; each process reads only the positions of the
rows it supplies (``sharding.local_rows``) and the rows become one global array
(``jax.make_array_from_process_local_data``). HVP batches are a deterministic function of
(seed, iteration), so a resumed, re-sharded or multi-process run draws exactly the same examples.
"""

from collections.abc import Iterator

import numpy as np
from jax.sharding import Mesh

from parallel import sharding
from tasks.base import Task
from tasks.sources import Source


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
