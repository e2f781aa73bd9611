"""LoRA adapters (Hu et al. 2021; rsLoRA scaling, Kalajdzievski 2023) for any flax.linen model,
without changing the model's code.

An adapted ``nn.Dense`` computes ``y = x W + b + s · (x Aᵀ) Bᵀ`` with A (r × d_in), B (d_out × r)
and the scale s = α/r (LoRA) or α/√r (rsLoRA, ``scaling``). Flax kernels are [in, out] (W is
d_in × d_out), so in the paper's torch convention the update is ΔW (out × in) = s·B A, and the
merged Flax kernel is W + s·(B A)ᵀ (``merge``).

Adapters are a nested dict that mirrors the module paths, relative to the root module that is
applied: ``{"layer_3": {"attention": {"query": {"a": A, "b": B}}}}`` adapts the Dense whose kernel
is ``layer_3/attention/query/kernel`` in the params. ``init_adapters`` picks the Dense layers by a
regex over those paths (``re.fullmatch``, e.g. ``layer_\\d+/attention/(query|value)``).

``attached(adapters, scale)`` applies a model with them: a Flax method interceptor adds the
low-rank term to the output of each adapted ``nn.Dense.__call__``, in the unmerged form above, so
no d_in × d_out matrix is ever built and per-example gradients w.r.t. A and B cost O(r (d_in +
d_out)) per call, and the model's Dense calls stay the same calls (other interceptors on
nn.Dense, ``influence/factorised.py``, see them, in either nesting order). Enter it inside the
function that is jitted, differentiated or vmapped, with the adapters among that function's
arguments: the interceptor then closes over the tracers of the current trace. (Entered around an
already-traced jitted function it does nothing: the cached trace never runs the interceptor.)
Only ``nn.Dense`` is adapted; a lifted ``nn.scan`` over layers (stacked 3-D kernels) is not.

Initialisation as the reference implementation (microsoft/LoRA ``loralib``, also PEFT's
default): A ~ Kaiming-uniform with a = √5, i.e. U(−1/√d_in, 1/√d_in), B = 0, so the adapted model
starts exactly at the base model and A's rows keep x Aᵀ at the scale of x whatever d_in is; the
learning rates and α of LoRA recipes transfer.
"""

import contextlib
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from runtime.errors import InputError

Adapters = dict[str, Any]
_SHOWN = 8  # candidate paths listed when a pattern matches nothing


def dense_kernels(base_params: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Every module path that owns a 2-D ``kernel`` leaf → (d_in, d_out), in tree order (the
    Dense layers; a conv kernel has more dimensions)."""
    kernels = {}
    for key, leaf in traverse_util.flatten_dict(dict(base_params)).items():
        if key[-1] == "kernel" and jnp.ndim(leaf) == 2:
            kernels["/".join(key[:-1])] = tuple(jnp.shape(leaf))
    return kernels


def init_adapters(
    base_params: Mapping[str, Any], targets: str, rank: int, key: jax.Array
) -> Adapters:
    """Rank-``rank`` adapters on the Dense layers of ``base_params`` whose module path fully
    matches ``targets``: A Kaiming-uniform (r × d_in), B zeros (d_out × r), in the kernel's dtype."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"LoRA rank={rank!r}: it must be an integer of at least 1")
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise InputError(f"LoRA targets={targets!r} is not a regular expression ({e})") from None
    kernels = dense_kernels(base_params)
    if not kernels:
        raise InputError("LoRA: the params have no Dense layer (no 2-D 'kernel' leaf) to adapt")
    matched = {p: shape for p, shape in kernels.items() if pattern.fullmatch(p)}
    if not matched:
        shown = ", ".join(sorted(kernels)[:_SHOWN]) + (", ..." if len(kernels) > _SHOWN else "")
        raise InputError(
            f"LoRA targets={targets!r} match no Dense layer's path; the {len(kernels)} there are: "
            f"{shown}"
        )
    for path, (d_in, d_out) in matched.items():
        if rank > min(d_in, d_out):
            raise InputError(
                f"LoRA rank={rank} exceeds min(d_in, d_out)={min(d_in, d_out)} of {path} "
                f"(kernel {d_in}×{d_out}); use a smaller rank or leave that layer out of targets"
            )
    flat = traverse_util.flatten_dict(dict(base_params))
    adapters: dict[tuple[str, ...], jax.Array] = {}
    paths = sorted(matched)  # the keys do not depend on the params' dict order
    for path, k in zip(paths, jax.random.split(key, len(paths)), strict=True):
        (d_in, d_out), names = matched[path], tuple(path.split("/"))
        dtype, bound = flat[(*names, "kernel")].dtype, 1.0 / math.sqrt(d_in)
        adapters[(*names, "a")] = jax.random.uniform(k, (rank, d_in), dtype, -bound, bound)
        adapters[(*names, "b")] = jnp.zeros((d_out, rank), dtype)
    return traverse_util.unflatten_dict(adapters)


def scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """The scale s of the low-rank term: α/r (Hu et al.), or α/√r (rsLoRA: keeps the update's
    size stable as the rank grows, Kalajdzievski 2023)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"LoRA rank={rank!r}: it must be an integer of at least 1")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _table(adapters: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[Any, Any]]:
    """Module path (a tuple of names) → (A, B), checked: each adapted module has exactly 'a' and
    'b', 2-D, of one rank."""
    parts: dict[tuple[str, ...], dict[str, Any]] = {}
    for key, leaf in traverse_util.flatten_dict(dict(adapters)).items():
        parts.setdefault(key[:-1], {})[key[-1]] = leaf
    table = {}
    for path, leaves in parts.items():
        name = "/".join(path)
        if set(leaves) != {"a", "b"}:
            raise InputError(f"LoRA adapter {name} has leaves {sorted(leaves)}, not 'a' and 'b'")
        a, b = leaves["a"], leaves["b"]
        if jnp.ndim(a) != 2 or jnp.ndim(b) != 2 or jnp.shape(a)[0] != jnp.shape(b)[1]:
            raise InputError(
                f"LoRA adapter {name}: a {jnp.shape(a)} and b {jnp.shape(b)} are not "
                "(rank, d_in) and (d_out, rank)"
            )
        table[path] = (a, b)
    return table


@contextlib.contextmanager
def attached(adapters: Mapping[str, Any], scale: float | jax.Array) -> Iterator[None]:
    """Within this context, every adapted ``nn.Dense`` call of any Flax model adds
    ``scale · (x Aᵀ) Bᵀ`` to its output (see the module docstring for where to enter it)."""
    table = _table(adapters)

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not table:
            return next_fun(*args, **kwargs)
        adapter = table.get(tuple(context.module.path))
        if adapter is None:
            return next_fun(*args, **kwargs)
        name = "/".join(context.module.path)
        if not isinstance(context.module, nn.Dense):
            raise InputError(
                f"LoRA adapts nn.Dense only; {name} is {type(context.module).__name__}"
            )
        x = args[0] if args else kwargs["inputs"]
        y = next_fun(*args, **kwargs)
        a, b = adapter
        if a.shape[1] != x.shape[-1] or b.shape[0] != y.shape[-1]:
            raise InputError(
                f"LoRA adapter {name}: a {a.shape}, b {b.shape} do not fit a Dense of "
                f"{x.shape[-1]} → {y.shape[-1]} features"
            )
        return y + (scale * ((x @ a.T) @ b.T)).astype(y.dtype)

    with nn.intercept_methods(interceptor):
        yield


def apply(
    model: nn.Module,
    base_params: Mapping[str, Any],
    adapters: Mapping[str, Any],
    scale: float | jax.Array,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """``model.apply({'params': base_params}, *args, **kwargs)`` with the adapters attached."""
    with attached(adapters, scale):
        return model.apply({"params": base_params}, *args, **kwargs)


def merge(
    base_params: Mapping[str, Any], adapters: Mapping[str, Any], scale: float | jax.Array
) -> dict[str, Any]:
    """The base params with each adapted kernel replaced by W + scale·(B A)ᵀ: the same function
    as the attached adapters (for tests and export; differentiable in both arguments)."""
    flat = traverse_util.flatten_dict(dict(base_params))
    for path, (a, b) in _table(adapters).items():
        key = (*path, "kernel")
        if key not in flat:
            raise InputError(f"LoRA adapter {'/'.join(path)} has no kernel in the params")
        kernel = flat[key]
        if jnp.shape(kernel) != (jnp.shape(a)[1], jnp.shape(b)[0]):
            raise InputError(
                f"LoRA adapter {'/'.join(path)}: a {jnp.shape(a)}, b {jnp.shape(b)} do not fit "
                f"its kernel {jnp.shape(kernel)}"
            )
        flat[key] = (kernel + scale * (b @ a).T).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)
