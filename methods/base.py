"""The method contract: what a way of approximating H⁻¹ gives the pipeline.

Three kinds of method (``Kind``), scored by one scorer (``stages/score.py``) with the same
fan-out, resumption and outputs:

- ``EIGENPAIR`` (arnoldi, randproj, randselect, exact): a ``fit`` produces eigenpairs (G with
  orthonormal rows, eigenvalues λ) and H⁻¹ ≈ Gᵀ diag(1/λ) G, plus (I − GᵀG)/σ where
  ``distill.tail`` sets a σ; self-influence Σᵢ gᵢ²/λᵢ and train → test ⟨g(x)/λ, g(z)⟩ with
  g = G∇ℓ (Schioppa et al. 2022, Alg. 1 lines 24–26).
- ``OPERATOR`` (lissa, cg, hyperinf, datainf, ekfac): P ≈ (H + λI)⁻¹ applied to vectors (iterative
  solves over HVPs, or per-layer inverses a ``fit`` computes once); train → test ⟨∇ℓ(x), P∇ℓ(z)⟩
  with the solved query gradients as tangents, self-influence ⟨∇ℓ(x), P∇ℓ(x)⟩ from each example's
  gradient (``parallel/operator_products.py``).
- ``GRADIENT`` (graddot, tracin): H ≈ σI, full-gradient products; nothing to fit.

Influence on the mean validation loss (``score.validation``), ⟨∇ℓ(x), P v̄⟩, is one more tangent
for every kind. A method of one's own is a module holding a ``Method`` (``config.method.name =
"my_package.my_method:METHOD"``, ``methods/registry.py``); what its ``fit`` returns is saved by
the fit stage with the method's fingerprint and reused while it matches.

What a method receives is a ``Context`` (the stages build it, ``stages/setup.py``): the config,
mesh, task, parameter selection and shardings, and the means to read batches, report progress,
checkpoint its own resumable state and notice a preemption, so a method of one's own is one
module that imports nothing above ``methods/``.
"""

import dataclasses
import enum
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from checkpoints import fingerprint
from checkpoints.checkpointer import Checkpointer
from influence.selection import Selection
from runtime import preemption, workdir
from runtime.config import Block
from runtime.progress import Progress
from tasks import batching
from tasks.base import Task
from tasks.sources import Source


class Kind(enum.Enum):
    """How a method's approximation of H⁻¹ is scored (module docstring)."""

    EIGENPAIR = "eigenpair"
    OPERATOR = "operator"
    GRADIENT = "gradient"


class Fitted(NamedTuple):
    """A method's artifact: ``eigvecs`` stacked like the selected params ((k, …) leaves,
    orthonormal rows, sharded like them), ``eigvals`` (k,), ``ritz_residuals`` (k,) estimates
    of ‖H vᵢ − λᵢ vᵢ‖, and ``summary`` (JSON: written to fit.json and the meta);
    ``operator``: the state an ``OPERATOR`` method fitted (per-layer inverses), saved instead
    of eigenpairs, or None."""

    eigvecs: Any
    eigvals: np.ndarray
    ritz_residuals: np.ndarray
    summary: dict[str, Any]
    operator: Any = None


class Operator(Protocol):
    """P ≈ (H + λI)⁻¹ at score time: ``solve(vectors)`` = P applied to each row of a stacked
    pytree ((k, …) leaves laid out like the selected params), returned the same way."""

    def solve(self, vectors: Any) -> Any: ...


def fitted(
    eigvecs: Any, eigvals: np.ndarray, residuals: np.ndarray, num_hvps: int, **extra: Any
) -> Fitted:
    """``Fitted`` with the summary every eigenpair method writes (fit.json): λ, the residuals
    ‖Hv − λv‖ absolute and relative to |λ|, the Ritz values (the tail's ``ritz`` σ reads those
    beyond the kept ones; the kept ones unless ``extra`` gives ``all_ritz_values``), the HVPs it
    took, and ``extra``."""
    eigvals, residuals = np.asarray(eigvals, np.float64), np.asarray(residuals, np.float64)
    summary = {
        "eigvals": eigvals.tolist(),
        "ritz_residuals": residuals.tolist(),
        "relative_ritz_residuals": (residuals / np.maximum(np.abs(eigvals), 1e-30)).tolist(),
        "all_ritz_values": eigvals.tolist(),
        "num_hvps": int(num_hvps),
        **extra,
    }
    return Fitted(eigvecs, eigvals, residuals, summary)


def empty_fitted(like: Any, summary: dict[str, Any], operator: Any) -> Fitted:
    """``Fitted`` of a method whose artifact is its ``operator`` state alone: no eigenpairs."""
    eigvecs = jax.tree.map(lambda x: np.zeros((0, *x.shape), x.dtype), like)
    none = np.zeros(0, np.float32)
    return Fitted(eigvecs, none, none, summary, operator)


def _no_check(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    del config, mesh


@dataclasses.dataclass(frozen=True)
class Context:
    """One stage's view of the run.

    Attributes:
      config: the whole config (a method reads its own fields: ``method.*``, ``arnoldi.*``, ...).
      workdir: the run's workdir; a method's own files go under ``results``.
      mesh: the device mesh ('data', 'model').
      task: the task (``tasks/base.py``), its splits restricted by ``config.filter``.
      params_like: ShapeDtypeStructs of the task's params (no array is allocated).
      param_sh: a NamedSharding per param leaf (``parallel/sharding.py`` rules).
      selection: the leaves influence covers (``config.params``, else the task's default).
      method: the configured method.
      params_id: the digest of the trained params' fingerprint, once they are restored ("" before).
      reached_preemption: step → whether to save and stop there, the same on every process
        (``runtime/preemption.py``); a loop calls it once per step.
    """

    config: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: Mesh
    task: Task
    params_like: Any
    param_sh: Any
    selection: Selection
    method: "Method"
    params_id: str = ""
    reached_preemption: Callable[[int], bool] = lambda step: preemption.reached(step)

    @property
    def vectors_like(self) -> Any:
        """The selected leaves of ``params_like``: the shape of every Krylov vector, eigenvector
        and gradient influence is taken over."""
        return self.selection.select(self.params_like)

    @property
    def vector_sh(self) -> Any:
        return self.selection.select(self.param_sh)

    @property
    def results(self) -> epath.Path:
        """The method's own directory in the workdir (``runtime/workdir.py``)."""
        return workdir.results(self.workdir, self.method.name)

    def with_params_id(self, params_id: str) -> "Context":
        return dataclasses.replace(self, params_id=params_id)

    def split(self, name: str) -> Source:
        return self.task.splits[name]

    def batch(self, split: str, positions: np.ndarray) -> dict:
        """Examples ``positions`` of ``split`` as one global batch of model inputs, sharded over
        'data' (this process reads only its own rows)."""
        return batching.global_batch(self.task, self.split(split), positions, self.mesh)

    def hvp_batch(self, seed: int, iteration: int) -> dict:
        """The training batch of HVP number ``iteration`` as Arnoldi draws them (Alg. 1, line 4):
        ``arnoldi.hvp_batch_size`` examples, seeded by (seed, iteration), or one fixed batch
        with ``arnoldi.fixed_batch``."""
        a = self.config.arnoldi
        positions = batching.hvp_batch_indices(
            self.split("train").num_examples, a.hvp_batch_size, seed, iteration, a.fixed_batch
        )
        return self.batch("train", positions)

    def progress(self, name: str, total: int) -> Progress:
        """Progress of a loop of the method: log lines, and TensorBoard scalars in its results."""
        return Progress(self.results, name, total, self.config.log_every_secs)

    def checkpointer(self, name: str, **options: Any) -> Checkpointer:
        """A ``Checkpointer`` for the method's own resumable state in ``results / name``."""
        return Checkpointer(self.results / name, **options)

    def fingerprint(self, *names: str) -> fingerprint.Fingerprint:
        """What a result of the method computed from the trained params depends on: the params,
        the selected leaves, l2, the method's name and the config fields ``names``."""
        if not self.params_id:
            raise RuntimeError("Context.fingerprint before the trained params are restored")
        selected = fingerprint.selection(self.selection.selected, len(self.selection.paths))
        return fingerprint.fit(self.config, self.params_id, selected, self.method.name, names)


@dataclasses.dataclass(frozen=True)
class Method:
    """One method.

    Attributes:
      name: its ``config.method.name``.
      kind: how it is scored (``Kind``).
      equation: the approximation of H⁻¹ it makes, for logs and docs.
      config: the config fields it reads, with their defaults (``runtime/config.py``); the base
        config assembles every method's.
      fingerprint: the config fields (dotted) its artifact depends on beyond the trained params,
        the parameter selection and l2, which every fit depends on.
      fit: (context, params) → ``Fitted``; None: nothing to fit.
      check: (config, mesh) → None, raising ``InputError``: input checks before any work.
      check_size: (config, the selected leaves as ShapeDtypeStructs) → None, raising
        ``InputError``: checks that need the model's size or shapes, run by every stage's
        set-up (the train job's included), before any params are trained or restored.
      keeps_top_k: it keeps p̃ = ``distill.top_k`` eigenpairs (the report sweeps p̃).
      num_vectors: (config, p) → the eigenpairs it keeps otherwise, p the number of selected
        params (default: none).
      sigma: H ≈ σI outside its eigenpairs, its own (a ``GRADIENT`` method: 1).
      checkpoints: scores are the sum over the params the train job kept after each epoch of
        ``train.keep_epochs``, each weighted by its learning rate (TracIn), instead of the
        final params alone.
      operator: (context, params, fitted operator state or None) → the ``Operator`` P the score
        job applies (an ``OPERATOR`` method).
      operator_like: context → the fitted operator state as ShapeDtypeStructs with shardings
        (its restore target), for an ``OPERATOR`` method whose ``fit`` saves one.
      state: subdirectories of its results holding resumable state of its fit that a run with
        other ``distill.*`` fields can share (Arnoldi's ``krylov``: one Krylov run serves every
        p̃ of the report).
      reference: exact: the reference the report compares eigenvalues and rankings against.
      seed_field: the config field that seeds its fit (the report's spread between two seeds).
      advice: (config, converged pairs, kept pairs, max relative move between seeds or None) →
        sentences on what to raise when its fit has not converged (the report's words).
    """

    name: str
    kind: Kind
    equation: str
    config: tuple[Block, ...] = ()
    fingerprint: tuple[str, ...] = ()
    fit: Callable[[Context, Any], Fitted] | None = None
    check: Callable[[ml_collections.ConfigDict, Mesh], None] = _no_check
    check_size: Callable[[ml_collections.ConfigDict, Any], None] | None = None
    keeps_top_k: bool = False
    num_vectors: Callable[[ml_collections.ConfigDict, int], int] | None = None
    sigma: float | None = None
    checkpoints: bool = False
    operator: Callable[[Context, Any, Any], Operator] | None = None
    operator_like: Callable[[Context], Any] | None = None
    state: tuple[str, ...] = ()
    reference: bool = False
    seed_field: str | None = None
    advice: Callable[[ml_collections.ConfigDict, int, int, float | None], list[str]] | None = None

    def __post_init__(self) -> None:
        wrong = {
            Kind.EIGENPAIR: self.fit is None or self.operator is not None,
            Kind.OPERATOR: self.operator is None,
            Kind.GRADIENT: self.sigma is None or self.fit is not None,
        }[self.kind]
        if wrong:
            raise TypeError(
                f"method {self.name!r} of kind {self.kind.value}: an eigenpair method has a fit "
                "and no operator, an operator method an operator, a gradient method a sigma and "
                "no fit"
            )

    def vectors(self, config: ml_collections.ConfigDict, num_params: int) -> int:
        """k, the eigenpairs its fit keeps (0 but for ``EIGENPAIR`` methods)."""
        if self.keeps_top_k:
            return int(config.distill.top_k)
        return self.num_vectors(config, num_params) if self.num_vectors else 0

    @property
    def saves_fit(self) -> bool:
        """Whether the fit stage computes and saves an artifact (else scoring needs none)."""
        return self.fit is not None
