"""Influence over a subset of the parameters: the selected leaves vary, the rest are constants.

The paper restricts influence to some layers (Schioppa et al. 2022, Table 2 "last 3 decoder
layers", Table 6 "top 10% / 20% of parameters"); LoRA influence is over the adapters only. With
θ = (θ_S, θ_F) split into selected and frozen leaves, everything Arnoldi and scoring compute is the
same math on ℓ(θ_S) = ℓ(θ_S, θ_F) at fixed θ_F: the Hessian block H_SS, its Krylov basis and
eigenvectors live in the space of θ_S only, and g = G_S ∇_S ℓ(x).

Leaves are named by their path in the params tree, keys joined with '/' (``Dense_1/kernel``,
``decoder/layers_3/attention/query/kernel``). A ``Selection`` keeps the leaves whose path matches
``include`` (``re.fullmatch``; empty: every leaf) and does not match ``exclude`` (empty: none). The
selected subtree is a nested dict of those leaves (the same structure for params, shardings and
ShapeDtypeStructs); when every leaf is selected it is the params tree itself, so nothing changes
for a full-model run. The frozen leaves are never copied: ``merge`` puts the selected leaves back
into the full params inside the jitted function, where XLA sees only a re-assembly of inputs.
"""

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
from flax import traverse_util

from influence.errors import UserError
from influence.types import Params, PerExampleLoss


class SelectionError(UserError):
    """A parameter pattern that is not a valid regex or selects no parameter."""


def leaf_path(path: tuple[Any, ...]) -> str:
    """'a/b/c' for a ``jax.tree_util`` key path (dict keys, sequence indices, attributes)."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def leaf_paths(tree: Any) -> list[str]:
    return [leaf_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _compile(pattern: str, field: str) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise SelectionError(f"{field}={pattern!r} is not a valid regular expression ({e})") from e


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which leaves of the params influence covers (hashable: it is static under ``jax.jit``).

    Attributes:
      paths: every leaf path of the params, in flattening order.
      selected: the selected paths, in the same order.
      state: the paths of model state (BatchNorm statistics): never selected, not parameters.
    """

    paths: tuple[str, ...]
    selected: tuple[str, ...]
    state: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        params_like: Any,
        include: str = "",
        exclude: str = "",
        *,
        state: str = "",
        last_fraction: float = 0.0,
        rank: Callable[[str], Any] | None = None,
    ) -> "Selection":
        """The leaves of ``params_like`` matching ``include`` and not ``exclude``; a pattern that
        selects nothing is an error listing a few of the paths, so a typo costs nothing.

        ``state`` leaves (BatchNorm statistics) are never selected, whatever the patterns say.
        ``last_fraction`` > 0 then keeps only the last layers in forward order (``rank``, from
        the task: equal for the leaves of one layer) that together hold at least that fraction
        of the candidates' parameters: the paper's "top 10% / 20% of parameters" (Schioppa et
        al. 2022, Table 6).
        """
        inc = _compile(include, "params.include")
        exc = _compile(exclude, "params.exclude")
        never = _compile(state, "the task's state pattern")
        paths = tuple(leaf_paths(params_like))
        chosen = tuple(
            p
            for p in paths
            if (inc is None or inc.fullmatch(p))
            and (exc is None or not exc.fullmatch(p))
            and (never is None or not never.fullmatch(p))
        )
        if not chosen:
            shown = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
            raise SelectionError(
                f"params.include={include!r} params.exclude={exclude!r} select none of the "
                f"{len(paths)} parameter leaves (paths are matched whole, e.g. {shown})"
            )
        if last_fraction:
            chosen = _last(chosen, params_like, paths, last_fraction, rank)
        state_paths = tuple(p for p in paths if never is not None and never.fullmatch(p))
        return cls(paths, chosen, state_paths)

    @property
    def everything(self) -> bool:
        return len(self.selected) == len(self.paths)

    def select(self, tree: Any) -> Any:
        """The selected leaves of ``tree`` (params, shardings or ShapeDtypeStructs shaped like the
        params) as a nested dict; ``tree`` itself when every leaf is selected."""
        if self.everything:
            return tree
        leaves = jax.tree.leaves(tree, is_leaf=lambda x: x is None)
        if len(leaves) != len(self.paths):
            raise ValueError(f"tree has {len(leaves)} leaves, the params {len(self.paths)}")
        flat = dict(zip(self.paths, leaves, strict=True))
        return traverse_util.unflatten_dict({tuple(p.split("/")): flat[p] for p in self.selected})

    def merge(self, params: Params, selected: Params) -> Params:
        """``params`` with its selected leaves replaced by those of ``selected``."""
        if self.everything:
            return selected
        flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(selected).items()}
        leaves, treedef = jax.tree.flatten(params)
        merged = [flat.get(p, leaf) for p, leaf in zip(self.paths, leaves, strict=True)]
        return jax.tree.unflatten(treedef, merged)

    def restrict(self, per_example_loss: PerExampleLoss, params: Params) -> PerExampleLoss:
        """ℓ(θ_S, batch) = ℓ(merge(params, θ_S), batch): the loss as a function of the selected
        leaves, the others held at their values in ``params``."""
        if self.everything:
            return per_example_loss
        return lambda selected, batch: per_example_loss(self.merge(params, selected), batch)

    def num_params(self, params_like: Any) -> int:
        """How many parameters the selected leaves hold (the dimension p influence is over)."""
        return sum(int(x.size) for x in jax.tree.leaves(self.select(params_like)))

    def describe(self, params_like: Any) -> str:
        """'S of N parameters (k of m leaves)' for logs; state leaves are not parameters and
        are counted apart."""
        sizes = dict(zip(self.paths, (x.size for x in jax.tree.leaves(params_like)), strict=True))
        chosen = sum(sizes[p] for p in self.selected)
        state = set(self.state)
        total = sum(n for p, n in sizes.items() if p not in state)
        text = (
            f"{chosen:,} of {total:,} parameters "
            f"({len(self.selected)} of {len(self.paths) - len(state)} leaves)"
        )
        if state:
            held = sum(sizes[p] for p in state)
            text += f"; {held:,} values of state held fixed ({len(state)} leaves)"
        return text


def _last(
    chosen: tuple[str, ...],
    params_like: Any,
    paths: tuple[str, ...],
    fraction: float,
    rank: Callable[[str], Any] | None,
) -> tuple[str, ...]:
    """The last of ``chosen`` in forward order holding ≥ ``fraction`` of their parameters."""
    if not 0.0 < fraction <= 1.0:
        raise SelectionError(f"params.last_fraction={fraction} must be in (0, 1]")
    if rank is None:
        raise SelectionError(
            "params.last_fraction needs the task to order its layers (Task.param_rank); "
            "this task does not: name the leaves with params.include instead"
        )
    sizes = dict(zip(paths, (int(x.size) for x in jax.tree.leaves(params_like)), strict=True))
    total = sum(sizes[p] for p in chosen)
    kept, held = [], 0
    # Whole groups of equal rank (a layer's kernel and bias) at a time, from the head backwards.
    ordered = sorted(chosen, key=lambda p: (rank(p), p), reverse=True)
    for p in ordered:
        if held >= fraction * total and rank(p) != rank(kept[-1]):
            break
        kept.append(p)
        held += sizes[p]
    keep = set(kept)
    return tuple(p for p in chosen if p in keep)


def restricted(
    per_example_loss: PerExampleLoss, params: Params, selection: Selection | None
) -> tuple[PerExampleLoss, Params]:
    """(loss over the selected leaves, the selected leaves of ``params``): what the HVP and the
    products differentiate. ``selection=None`` means every leaf."""
    if selection is None:
        return per_example_loss, params
    return selection.restrict(per_example_loss, params), selection.select(params)
