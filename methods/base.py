"""The method contract: what a way of approximating H⁻¹ gives the pipeline.

Every built-in method but one approximates H⁻¹ on a subspace by eigenpairs (G with orthonormal
rows, eigenvalues λ), and may add an isotropic term σ on the rest:

    H⁻¹ ≈ Gᵀ diag(1/λ) G + (I − GᵀG) / σ

so each of them is a ``fit`` that produces eigenpairs, and the score job (``stages/score.py``),
its fan-out, resumption and outputs are the same for all: self-influence Σᵢ gᵢ²/λᵢ, train → test
⟨g(x)/λ, g(z)⟩ with g = G∇ℓ (Schioppa et al. 2022, Alg. 1 lines 24–26), plus the σ term where a
method (``sigma``) or ``distill.tail`` sets one. ``graddot`` (H = I) is the degenerate case: no
eigenpairs, σ = 1.

A method of one's own is a module holding a ``Method`` (``config.method.name =
"my_package.my_method:METHOD"``, ``methods/registry.py``); its ``fit`` returns ``Fitted``, which
the fit job (``stages/fit.py``) saves with the method's fingerprint and reuses while it matches.

The other methods apply their approximation P ≈ (H + λI)⁻¹ to vectors instead (an ``Operator``:
iterative solves over HVPs for ``lissa`` and ``cg``, per-layer inverses for ``hyperinf`` and
``datainf``). The same scorer serves them: train → test ⟨∇ℓ(x), P∇ℓ(z)⟩ with the solved query
gradients P∇ℓ(z) as its tangents, and self-influence ⟨∇ℓ(x), P∇ℓ(x)⟩ from each example's gradient
(``parallel/operator_products.py``). Influence on the mean validation loss (``score.validation``),
⟨∇ℓ(x), P v̄⟩, is one more such tangent for every method, eigenpair methods included
(``EigenOperator``).
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh


class Fitted(NamedTuple):
    """A method's artifact: ``eigvecs`` stacked like the selected params ((k, …) leaves,
    orthonormal rows, sharded like them), ``eigvals`` (k,), ``ritz_residuals`` (k,) estimates
    of ‖H vᵢ − λᵢ vᵢ‖, and ``summary`` (JSON: written to eigenvalues.json and the meta);
    ``operator``: the state an ``Operator`` method fitted (per-layer inverses), saved beside
    them (k = 0 eigenpairs), or None."""

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
    """``Fitted`` with the summary every eigenpair method writes (eigenvalues.json): λ, the
    residuals ‖Hv − λv‖ absolute and relative to |λ|, all Ritz values (the tail's ``ritz`` σ
    reads those beyond the kept ones), the HVPs it took, and ``extra``."""
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


def _keeps_no_eigenpairs(config: ml_collections.ConfigDict, num_params: int) -> int:
    del config, num_params
    return 0


def _no_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    del config
    return {}


def config_fields(*names: str) -> Callable[[ml_collections.ConfigDict], dict[str, Any]]:
    """A method's ``fingerprint``: the values of the named config fields (dotted paths, e.g.
    ``"method.damping"``), keyed by their paths."""

    def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
        values = {}
        for name in names:
            value = config
            for part in name.split("."):
                value = value[part]
            values[name] = value
        return values

    return fingerprint


@dataclasses.dataclass(frozen=True)
class Method:
    """One method.

    Attributes:
      name: its ``config.method.name``.
      equation: the approximation of H⁻¹ it makes, for logs and the README.
      num_vectors: (config, p) → k, the eigenpairs it keeps, p the number of selected params
        (default: none).
      fingerprint: config → the fields its artifact depends on beyond the trained params, the
        parameter selection and l2 (which every fit depends on); ``config_fields`` names them
        (default: none).
      fit: (stage, params) → ``Fitted``; None: nothing to fit (k = 0).
      check: (config, mesh) → None, raising ``InputError``: input checks before any work.
      check_size: (config, the selected leaves as ShapeDtypeStructs) → None, raising
        ``InputError``: checks that need the model's size or shapes, run by every stage's
        set-up (the train job's included), before any params are trained or restored.
      sigma: the isotropic curvature of the method itself (graddot: 1), or None.
      stage: the module of a pipeline stage that fits it end to end with resumption of its own
        (Arnoldi: ``stages.arnoldi``, whose Krylov state is checkpointed), instead of ``fit``.
      checkpoints: scores are the sum over the params the train job kept after each epoch of
        ``train.keep_epochs``, each weighted by its learning rate (TracIn), instead of the
        final params alone.
      operator: (stage, params, fitted operator state or None) → the ``Operator`` P the score
        job applies; set for the methods scored by ⟨∇ℓ(x), P∇ℓ(x)⟩ per example instead of by
        eigenpairs (``parallel/operator_products.py``).
      operator_like: stage → the fitted operator state as ShapeDtypeStructs with shardings
        (its restore target), for an ``operator`` method whose ``fit`` saves one.
    """

    name: str
    equation: str
    num_vectors: Callable[[ml_collections.ConfigDict, int], int] = _keeps_no_eigenpairs
    fingerprint: Callable[[ml_collections.ConfigDict], dict[str, Any]] = _no_fields
    fit: Callable[[Any, Any], Fitted] | None = None
    check: Callable[[ml_collections.ConfigDict, Mesh], None] = _no_check
    check_size: Callable[[ml_collections.ConfigDict, Any], None] | None = None
    sigma: float | None = None
    stage: str | None = None
    checkpoints: bool = False
    operator: Callable[[Any, Any, Any], Operator] | None = None
    operator_like: Callable[[Any], Any] | None = None
