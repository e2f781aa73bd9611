"""Random-access example sources: how a host reads only the examples it needs.

Every batch the pipeline builds is a list of global example positions: HVP batches are drawn from
(seed, iteration), scoring walks fixed row ranges. Each process asks its source for the positions
of its own rows and nothing else, so with an on-disk source a host reads only its share, and a
resumed or re-sharded run (other process count, other mesh) reads exactly the same examples. A
streaming ``tf.data`` reader cannot do that without re-reading from the start, which is why the
sources here are random access (TFDS's ``as_data_source`` over ArrayRecord files, as grain uses).
"""

from collections.abc import Callable
from typing import Protocol

import numpy as np
from etils import epath

from influence.errors import UserError

Columns = dict[str, np.ndarray]
"""Host-memory columns of some examples, each with the example axis first."""


class DataError(UserError):
    """A dataset, data source or task setting that a task cannot use; the message says how to fix
    it. Tasks raise it for bad input only: any other exception from task code is a bug and keeps
    its traceback."""


class Source(Protocol):
    """A split's examples by position: ``take(positions)`` returns their columns in that order."""

    @property
    def num_examples(self) -> int: ...

    def take(self, positions: np.ndarray) -> Columns: ...


class ArraySource:
    """Examples held in memory (small datasets: the embedded MNIST 5k, ``.npz`` files)."""

    def __init__(self, columns: Columns):
        sizes = {len(v) for v in columns.values()}
        if len(sizes) != 1:
            raise DataError(
                f"columns of unequal length: { {k: len(v) for k, v in columns.items()} }"
            )
        self._columns = columns
        self._size = sizes.pop()

    @property
    def num_examples(self) -> int:
        return self._size

    def take(self, positions: np.ndarray) -> Columns:
        return {k: v[positions] for k, v in self._columns.items()}


class TfdsSource:
    """One split of a prepared TFDS dataset in ArrayRecord format, read record by record.

    ``builder_dir`` is the versioned directory TFDS wrote (``<data_dir>/<name>/<config>/<version>``,
    local or gs://); nothing is downloaded. Only the requested records are read and decoded.
    """

    def __init__(
        self,
        builder_dir: epath.PathLike,
        split: str,
        record_fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    ):
        import tensorflow_datasets as tfds  # imported lazily: it pulls in TensorFlow

        try:
            builder = tfds.builder_from_directory(str(builder_dir))
        except Exception as e:  # tfds raises several types for a missing or foreign directory
            raise DataError(
                f"{builder_dir} is not a prepared TFDS dataset directory "
                f"(<data_dir>/<name>/<version> with dataset_info.json): {e}"
            ) from e
        if split not in builder.info.splits:
            raise DataError(
                f"TFDS dataset {builder_dir} has no split {split!r}; it has {sorted(builder.info.splits)}"
            )
        try:
            self._records = builder.as_data_source(split=split)
        except Exception as e:
            raise DataError(
                f"TFDS dataset {builder_dir} cannot be read by position ({e}); prepare it with "
                "file_format='array_record'"
            ) from e
        self._size = len(self._records)
        self._record_fn = record_fn
        self.info = builder.info

    @property
    def num_examples(self) -> int:
        return self._size

    def take(self, positions: np.ndarray) -> Columns:
        records = self._records.__getitems__([int(i) for i in positions])
        if not records:
            raise ValueError("take() needs at least one position")
        if self._record_fn is not None:
            records = [self._record_fn(r) for r in records]
        return {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}


class MappedSource:
    """A view of ``base``: position i of the view is ``base`` row ``rows[i]``, passed through
    ``transform(columns, positions)`` (e.g. a label corruption that depends on the position)."""

    def __init__(
        self,
        base: Source,
        rows: np.ndarray,
        transform: Callable[[Columns, np.ndarray], Columns] | None = None,
    ):
        self._base, self._rows, self._transform = base, np.asarray(rows), transform

    @property
    def num_examples(self) -> int:
        return int(self._rows.size)

    def take(self, positions: np.ndarray) -> Columns:
        positions = np.asarray(positions)
        columns = self._base.take(self._rows[positions])
        return self._transform(columns, positions) if self._transform else columns


TFDS_PREFIX = "tfds:"


def tfds_location(source: str) -> tuple[str, str] | None:
    """(builder_dir, split) of a ``tfds:<builder_dir>[:split]`` data source (split defaults to
    'train'); None for any other source string."""
    if not source.startswith(TFDS_PREFIX):
        return None
    builder_dir, _, split = source[len(TFDS_PREFIX) :].partition(":")
    return builder_dir, split or "train"


def read_all(source: Source) -> Columns:
    """Every example of a (small) source in memory: for tests, benchmarks and tiny datasets."""
    return source.take(np.arange(source.num_examples))
