"""g = G∇ℓ(x) for a batch with the tangents in host memory (``score.eigvecs_storage=host``):
forward mode, one chunk of tangents on the devices at a time (Alg. 1, lines 19–22, as
``parallel/products.py``, the tangents streamed by ``parallel/tangent_stream.py``).

Only forward mode streams: each JVP reads one tangent, so a batch's products are the chunks'
columns side by side. Reverse mode's GEMM reads every eigenvector for every batch and its
per-example gradients (rows × p floats) are themselves the memory problem at the sizes that need
this; it stays on the devices (``score.eigvecs_storage=device``), under ``score.memory_budget_mb``.

Memory per device: two chunks of tangents (the one the JVPs read, the next one arriving) plus the
forward program's working memory, which ``products.Program`` plans (tangents per ``lax.map`` step)
under what the two chunks leave of the budget. ‖∇ℓ(x)‖² (the tail's column) comes from one
reverse pass with no tangents, once per batch.

Every batch reads all of G from host memory: at PCIe's ~25 GB/s a p̃ = 100 G of a 1B model
(400 GB) takes 16 s a batch, so larger batches amortise it (docs/large_models.md).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from influence.selection import Selection
from parallel import products
from parallel.sharding import bytes_per_device
from parallel.tangent_stream import HostTangents


@dataclasses.dataclass
class Columns:
    """A dispatched batch's products as column blocks (one per chunk, then ‖∇ℓ‖²), the padding
    rows of the last chunk dropped (``keep``)."""

    parts: list[products.Rows]
    keep: np.ndarray

    def wait(self) -> None:
        for part in self.parts:
            part.wait()

    def all_finite(self) -> bool:
        return all(part.all_finite() for part in self.parts)

    def local(self) -> np.ndarray:
        return np.concatenate([part.local() for part in self.parts], axis=1)[:, self.keep]


class StreamedProgram:
    """``program(params, tangents, local_batch) -> Columns`` for ``HostTangents``."""

    def __init__(
        self,
        per_example_loss: Callable,
        param_sh: Any,
        vector_sh: Any,
        mesh: Mesh,
        selection: Selection | None,
        *,
        batch_size: int,
        memory_budget_mb: float,
        tangent_chunk: int = 0,
        sqnorm: bool = False,
    ) -> None:
        def program(mode: str, budget_mb: float, sqnorm: bool) -> products.Program:
            return products.Program(
                per_example_loss,
                param_sh,
                vector_sh,
                mesh,
                selection,
                batch_size=batch_size,
                mode=mode,
                memory_budget_mb=budget_mb,
                tangent_chunk=tangent_chunk if mode == "forward" else 0,
                sqnorm=sqnorm,
            )

        self._program, self._budget_mb, self._sqnorm = program, memory_budget_mb, sqnorm
        self._forward: products.Program | None = None
        self._norms: products.Program | None = None
        self._none: Any = None  # zero tangents on the devices: the ‖∇ℓ‖² program's argument

    def _plan(self, tangents: HostTangents) -> None:
        """The forward program under what two chunks leave of the budget (and the ‖∇ℓ‖² one)."""
        budget = products.budget_bytes(self._budget_mb)
        chunk = bytes_per_device(tangents.chunks[0])
        left = budget - 2 * chunk
        if left <= 0:
            raise products.MemoryBudgetError(
                f"score.eigvecs_storage=host: two chunks of {tangents.width} tangents take "
                f"{2 * chunk / products.MIB:,.0f} MiB per device, the whole memory budget of "
                f"{budget / products.MIB:,.0f} MiB; set score.tangent_chunk lower or raise "
                "score.memory_budget_mb"
            )
        self._forward = self._program("forward", left / products.MIB, False)
        if self._sqnorm:
            self._norms = self._program("reverse", left / products.MIB, True)
            self._none = jax.tree.map(
                lambda x, s: jax.device_put(np.zeros((0, *x.shape[1:]), x.dtype), s),
                tangents.chunks[0],
                tangents.device_sh,
            )

    def __call__(
        self, params: Any, tangents: HostTangents, local: dict[str, np.ndarray]
    ) -> Columns:
        if self._forward is None:
            self._plan(tangents)
        parts: list[products.Rows] = []

        def use(c: int, chunk: Any) -> Any:
            parts.append(self._forward(params, chunk, local))
            return parts[-1].pieces

        tangents.stream(use)
        keep = np.arange(tangents.num_rows)
        if self._norms is not None:
            parts.append(self._norms(params, self._none, local))
            keep = np.append(keep, tangents.num_chunks * tangents.width)
        return Columns(parts, keep)
