"""Which rows each process scores at each step.

Scoring walks each split in fixed parts of ``examples_per_shard`` rows (``scoring/parts.py``: one
output file each, the unit of resumption). Parts are dealt round-robin to the process row groups;
each group walks its parts in host-local batches that carry the example positions and a validity
mask, and groups with less work are padded with masked batches, so every process runs the same
number of steps (none waits forever in a collective) and every example is scored exactly once.
"""

import dataclasses
from collections.abc import Iterator

import numpy as np

from scoring.parts import Part


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
