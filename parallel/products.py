"""How the score job computes g = G∇ℓ(x) for a batch (Alg. 1, lines 19–22): forward or reverse
mode (``influence/scoring.py``), each sized to a memory budget, and with ``score.mode=auto`` the
faster of the two, timed on the job's first batch.

The two modes cost very different things (Flax CNN, 2 CPU cores, 4,000 examples, p̃ = 100: JVPs
136 s, per-example gradients and one GEMM 20 s; issue 11), and which is faster depends on the
model, p̃, the batch and the hardware, so the job measures instead of guessing:

- **memory**: every candidate is compiled for the job's shapes first and XLA's own account of the
  program (``memory_analysis``: temporaries + outputs, per device) is held against
  ``score.memory_budget_mb``. Forward mode bounds it with ``lax.map`` over chunks of tangents,
  halving the chunk until it fits; reverse mode splits each global batch into more device calls
  of fewer rows (a ``lax.map`` over rows inside one program ran 3.7× slower on the CNN);
- **time** (auto, both fit): reverse mode scores the first batch (its result is kept: it *is*
  step 1) and forward mode runs one tangent chunk of it, its time scaled by the number of chunks
  (``lax.map`` runs them one after another), so the probe costs a fraction of a forward step.
  Auto compiles forward mode for that one chunk only, in a thread while reverse mode compiles,
  and compiles the chunked program only if it chooses forward mode;
- **agreement**: every process takes the smallest budget and the largest time of all processes,
  so all of them compile and run the same programs.

The choice is logged (both times, the working memory, the choice) and is not part of the scores'
fingerprint: the modes agree to rtol 1e-4, so resuming with another mode is a compatible change.
"""

import concurrent.futures
import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from influence.errors import UserError
from influence.selection import Selection
from parallel import programs, sharding
from parallel.mesh import DATA_AXIS

MODES = ("auto", "forward", "reverse")
# Largest tangent chunk forward mode starts from: working sets past a few tangents fall out of
# cache (Flax CNN, p̃ = 100, batch 256: chunks of 5 took 0.44× the time of all 100 at once).
FORWARD_CHUNK_CAP = 8
MIB = 2**20


class MemoryBudgetError(UserError):
    """No way to score the configured batches fits ``score.memory_budget_mb`` (a user error)."""


def budget_bytes(memory_budget_mb: float) -> int:
    """``score.memory_budget_mb`` in bytes; 0 means half the memory free on a local device now
    (accelerators: their allocator's limit less what is in use; CPU: available RAM shared by the
    local devices), agreed on by all processes (the smallest)."""
    if memory_budget_mb > 0:
        budget = int(memory_budget_mb * MIB)
    else:
        device = jax.local_devices()[0]
        stats = (device.memory_stats() if device.platform != "cpu" else None) or {}
        free = stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)
        if free > 0:
            budget = free // 2
        else:  # CPU: its figures are not an allocator's (a distributed CPU client's are past it)
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = free // (2 * jax.local_device_count())
    if jax.process_count() > 1:
        # In MiB: without jax_enable_x64 the gathered array is 32-bit, and bytes overflow it.
        mib = multihost_utils.process_allgather(np.float32(budget / MIB))
        budget = int(float(np.min(mib)) * MIB)
    return int(budget)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One way to project a global batch: ``calls`` device calls of ``rows`` examples each."""

    mode: str
    tangent_chunk: int | None  # forward: tangents per lax.map step; None: all p̃ at once
    calls: int
    rows: int
    working_bytes: int  # XLA's temporaries + outputs per device, one call
    executable: Callable = dataclasses.field(repr=False)

    def describe(self, num_vectors: int) -> str:
        how = (
            f"{self.tangent_chunk or num_vectors} of {num_vectors} tangents at a time"
            if self.mode == "forward"
            else f"{self.calls} call{'s' if self.calls > 1 else ''} of {self.rows} examples"
        )
        return f"{self.mode} ({how}, {self.working_bytes / MIB:,.0f} MiB per device)"


@dataclasses.dataclass
class Rows:
    """A dispatched batch's projections, one (g, all finite) pair per device call."""

    pieces: list[tuple[jax.Array, jax.Array]]

    def wait(self) -> None:
        jax.block_until_ready(self.pieces)

    def all_finite(self) -> bool:
        """Whether every projection of the global batch is finite (the same on every process)."""
        return all(bool(finite.addressable_data(0)) for _, finite in self.pieces)

    def local(self) -> np.ndarray:
        """This process' rows of the batch, in its local order."""
        return np.concatenate([sharding.to_host_local(g) for g, _ in self.pieces])


@dataclasses.dataclass
class Weighted:
    """Σ_c w_c · projections_c of one batch (TracIn's checkpoints); one term is as it is."""

    terms: list[tuple[Rows, float]]

    @classmethod
    def of(cls, terms: list[tuple[Rows, float]]) -> "Rows | Weighted":
        return terms[0][0] if len(terms) == 1 and terms[0][1] == 1.0 else cls(terms)

    def wait(self) -> None:
        for projected, _ in self.terms:
            projected.wait()

    def all_finite(self) -> bool:
        return all(projected.all_finite() for projected, _ in self.terms)

    def local(self) -> np.ndarray:
        return sum(np.float32(w) * projected.local() for projected, w in self.terms)


class Program:
    """``program(params, eigvecs, local_batch) -> Rows`` for global batches of
    ``batch_size`` rows; the plan (mode, chunking, calls) is made at the first call, from the
    first batch's shapes (and, under auto, its timing). ``sqnorm``: each row has one more
    column, ‖∇ℓ(x)‖² (``programs.jit_products``)."""

    def __init__(
        self,
        per_example_loss: Callable,
        param_sh: Any,
        vector_sh: Any,
        mesh: Mesh,
        selection: Selection | None,
        *,
        batch_size: int,
        mode: str,
        memory_budget_mb: float,
        tangent_chunk: int = 0,
        sqnorm: bool = False,
    ) -> None:
        self._loss, self._param_sh, self._vector_sh = per_example_loss, param_sh, vector_sh
        self._mesh, self._selection, self._batch_size = mesh, selection, batch_size
        self._mode, self._budget_mb, self._tangent_chunk = mode, memory_budget_mb, tangent_chunk
        self._sqnorm = sqnorm
        self.plan: Plan | None = None

    def __call__(self, params: Any, eigvecs: Any, local: dict[str, np.ndarray]) -> Rows:
        if self.plan is None:
            self.plan, first = self._choose(params, eigvecs, local)
            if first is not None:
                return first
        return self._run(self.plan, params, eigvecs, local)

    def _run(self, plan: Plan, params: Any, eigvecs: Any, local: dict) -> Rows:
        """Dispatch ``plan.calls`` calls, each on consecutive local rows (every process' i-th
        slice together form the i-th global sub-batch; ``Rows.local`` undoes the split)."""
        size = len(next(iter(local.values()))) // plan.calls
        pieces = []
        for i in range(plan.calls):
            piece = {k: v[i * size : (i + 1) * size] for k, v in local.items()}
            pieces.append(
                plan.executable(params, eigvecs, sharding.to_global(piece, self._mesh, plan.rows))
            )
        return Rows(pieces)

    def _compile(
        self, mode: str, chunk: int | None, rows: int, params: Any, eigvecs: Any, local: dict
    ) -> tuple[Callable, int]:
        """The program of ``mode`` compiled for ``rows`` global rows (the shapes and layouts of
        ``params``, ``eigvecs`` and ``local``'s columns), and XLA's per-device working memory
        for it (nothing runs)."""
        fn = programs.jit_products(
            self._loss,
            self._param_sh,
            self._vector_sh,
            self._mesh,
            chunk,
            self._selection,
            checked=True,
            mode=mode,
            sqnorm=self._sqnorm,
        )
        batch_sh = sharding.batch_sharding(self._mesh)
        batch = {
            k: jax.ShapeDtypeStruct(
                (rows, *np.shape(v)[1:]), np.asarray(v).dtype, sharding=batch_sh
            )
            for k, v in local.items()
        }
        compiled = fn.lower(params, eigvecs, batch).compile()
        stats = compiled.memory_analysis()
        working = stats.temp_size_in_bytes + stats.output_size_in_bytes if stats else 0
        return compiled, int(working)

    def _first_chunk(self, num_vectors: int) -> int | None:
        """Forward mode's starting tangent chunk: ``score.tangent_chunk`` as given, else all p̃
        at once up to ``FORWARD_CHUNK_CAP``, else equal chunks of at most that many (10 tangents:
        5 + 5, not 8 + 2)."""
        if self._tangent_chunk:
            return self._tangent_chunk
        if num_vectors <= FORWARD_CHUNK_CAP:
            return None
        return -(-num_vectors // -(-num_vectors // FORWARD_CHUNK_CAP))

    def _fit_forward(
        self,
        num_vectors: int,
        params: Any,
        eigvecs: Any,
        local: dict,
        budget: int,
        chunk: int | None = None,
        probe: bool = False,
    ) -> tuple[Plan, Any]:
        """(plan, the eigenvectors it runs on): forward mode with the largest equal tangent chunks
        (from ``chunk``, else ``_first_chunk``) that fit, or ``score.tangent_chunk`` as given;
        ``working_bytes`` over budget when nothing fits.

        ``probe`` (auto): a chunked plan is compiled for *one* chunk, on the first chunk of the
        eigenvectors. ``lax.map`` runs the chunks one after another, so its time × chunks is
        forward mode's time per batch, and its working memory plus the other chunks' outputs
        the chunked program's, which is compiled only if forward mode is chosen (``_full``)."""
        chunk = chunk or self._first_chunk(num_vectors)
        while True:
            width = chunk or num_vectors
            if probe and width < num_vectors:
                vectors = jax.jit(
                    lambda v, width=width: jax.tree.map(lambda x: x[:width], v),
                    out_shardings=sharding.stacked_shardings(self._vector_sh),
                )(eigvecs)
                exe, working = self._compile(
                    "forward", None, self._batch_size, params, vectors, local
                )
                rest = self._batch_size * (num_vectors - width) // self._mesh.shape[DATA_AXIS]
                working += 4 * rest
            else:
                vectors = eigvecs
                exe, working = self._compile(
                    "forward", chunk, self._batch_size, params, eigvecs, local
                )
            plan = Plan("forward", chunk, 1, self._batch_size, working, exe)
            if working <= budget or self._tangent_chunk or width == 1:
                return plan, vectors
            chunk = max(1, min(width // 2, int(width * budget / working)))

    def _fit_reverse(self, params: Any, eigvecs: Any, local: dict, budget: int) -> Plan:
        """Reverse mode in the fewest calls per batch that fit (each call's rows a multiple of
        the 'data' axis); ``working_bytes`` over budget when even the smallest call does not."""
        b, data = self._batch_size, self._mesh.shape[DATA_AXIS]
        splits = [k for k in range(1, b + 1) if b % k == 0 and (b // k) % data == 0]
        k = splits[0]
        while True:
            exe, working = self._compile("reverse", None, b // k, params, eigvecs, local)
            plan = Plan("reverse", None, k, b // k, working, exe)
            wanted = k * working / budget
            larger = [s for s in splits if s > k]
            if working <= budget or not larger:
                return plan
            k = next((s for s in larger if s >= wanted), larger[-1])

    def _plans(
        self, params: Any, eigvecs: Any, local: dict, budget: int, num_vectors: int
    ) -> tuple[dict[str, Plan], Any]:
        """({mode: its plan under the budget} of the modes to consider, the eigenvectors forward
        mode was planned on: all of them, or auto's one-chunk probe)."""
        plans, head = {}, eigvecs
        if num_vectors == 0:  # no tangents (graddot without queries): ‖∇ℓ‖² alone, reverse
            self._mode = "reverse"
        if self._mode == "auto":
            # The two compilations overlap (XLA compiles with the GIL released; each trace is
            # thread-local, Flax's interceptors included): on an accelerator the host's compile
            # time is most of what auto costs over the faster mode.
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                probe = pool.submit(
                    self._fit_forward, num_vectors, params, eigvecs, local, budget, probe=True
                )
                plans["reverse"] = self._fit_reverse(params, eigvecs, local, budget)
                plans["forward"], head = probe.result()
        elif self._mode == "forward":
            plans["forward"], _ = self._fit_forward(num_vectors, params, eigvecs, local, budget)
        else:
            plans["reverse"] = self._fit_reverse(params, eigvecs, local, budget)
        return plans, head

    def _choose(self, params: Any, eigvecs: Any, local: dict) -> tuple[Plan, Rows | None]:
        """The plan for every batch (and, under auto, the first batch's rows the timing made)."""
        budget = budget_bytes(self._budget_mb)
        num_vectors = jax.tree.leaves(eigvecs)[0].shape[0]
        plans, head = self._plans(params, eigvecs, local, budget, num_vectors)
        fitting = {m: p for m, p in plans.items() if p.working_bytes <= budget}
        if not fitting:
            needs = ", ".join(
                f"{p.describe(num_vectors)} needs {p.working_bytes / MIB:,.0f} MiB"
                for p in plans.values()
            )
            raise MemoryBudgetError(
                f"score.mode={self._mode}: no way to score batches of {self._batch_size} fits "
                f"the memory budget of {budget / MIB:,.0f} MiB per device ({needs}): lower "
                "score.batch_size or raise score.memory_budget_mb"
            )
        if len(fitting) == 1:
            (plan,) = fitting.values()
            reason = "as configured" if self._mode != "auto" else "the only mode that fits"
            plan = self._full(plan, head, num_vectors, params, eigvecs, local, budget)
            logging.info("score.mode=%s: %s, %s", self._mode, plan.describe(num_vectors), reason)
            return plan, None
        reverse, forward = fitting["reverse"], fitting["forward"]
        first, seconds = self._time(reverse, forward, params, eigvecs, head, local, num_vectors)
        if seconds["reverse"] <= seconds["forward"]:
            return reverse, first
        return self._full(forward, head, num_vectors, params, eigvecs, local, budget), first

    def _time(
        self,
        reverse: Plan,
        forward: Plan,
        params: Any,
        eigvecs: Any,
        head: Any,
        local: dict,
        num_vectors: int,
    ) -> tuple[Rows, dict[str, float]]:
        """Auto's timing of both modes on the first batch: (reverse mode's rows, seconds per
        batch of each mode, the slowest process's)."""
        start = time.perf_counter()
        first = self._run(reverse, params, eigvecs, local)
        first.wait()
        seconds = {"reverse": time.perf_counter() - start}
        start = time.perf_counter()
        self._run(forward, params, head, local).wait()
        probe_seconds = time.perf_counter() - start
        # The probe ran one chunk of a chunked plan, or the whole plan (one chunk, or a plan
        # that had to be halved below the first chunk).
        chunks = 1 if head is eigvecs else math.ceil(num_vectors / forward.tangent_chunk)
        seconds["forward"] = probe_seconds * chunks
        if jax.process_count() > 1:
            both = multihost_utils.process_allgather(
                np.array([seconds["reverse"], seconds["forward"]])
            )
            seconds = dict(zip(("reverse", "forward"), np.max(both, axis=0).tolist(), strict=True))
        how = (
            "timed on the batch"
            if chunks == 1
            else f"{probe_seconds:.3f} s for one chunk of {forward.tangent_chunk}, times {chunks}"
        )
        logging.info(
            "score.mode=auto: %s %.3f s per batch of %d; %s %.3f s (%s); chose %s",
            reverse.describe(num_vectors),
            seconds["reverse"],
            self._batch_size,
            forward.describe(num_vectors),
            seconds["forward"],
            how,
            "reverse" if seconds["reverse"] <= seconds["forward"] else "forward",
        )
        return first, seconds

    def _full(
        self,
        plan: Plan,
        head: Any,
        num_vectors: int,
        params: Any,
        eigvecs: Any,
        local: dict,
        budget: int,
    ) -> Plan:
        """The plan that scores every batch: ``plan`` itself, unless it is auto's one-chunk
        forward probe (run on ``head``, the first chunk of the eigenvectors), whose chunked
        program is compiled now, from the probe's chunk."""
        if plan.mode != "forward" or head is eigvecs:
            return plan
        chunk = plan.tangent_chunk
        return self._fit_forward(num_vectors, params, eigvecs, local, budget, chunk)[0]
