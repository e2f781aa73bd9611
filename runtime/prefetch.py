"""Reading ahead: host-side input work (reading records, decoding, tokenizing) for the next
batches runs in Grain threads while the device computes the current one.

Every batch the pipeline reads is a pure function of its step (HVP batches of (seed, iteration),
scoring steps of the plan, training steps of (seed, epoch)), so reading ahead changes nothing but
the timing: a resumed or preempted run reads exactly what it would have read. Grain's MapDataset
over the step indices keeps the order and prefetches with ``ReadOptions(num_threads,
prefetch_buffer_size)``; device transfers stay on the calling thread.
"""

from collections.abc import Callable, Iterator
from typing import TypeVar

import grain

T = TypeVar("T")


def ahead(
    read: Callable[[int], T], start: int, stop: int, threads: int, buffer: int
) -> Iterator[T]:
    """``read(start), read(start + 1), ..., read(stop - 1)`` in order; with ``threads > 0`` up to
    ``buffer`` of them are computed ahead by that many threads."""
    if threads <= 0 or stop - start <= 1:
        yield from map(read, range(start, stop))
        return
    steps = grain.MapDataset.range(start, stop).map(read)
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(buffer, 1))
    iterator = iter(steps.to_iter_dataset(options))
    try:
        yield from iterator
    finally:  # end Grain's reader threads with the loop (done, preempted or failed), not at exit
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
