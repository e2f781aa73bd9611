"""The selected leaves as dense layers, for a method that preconditions a layer's kernel and bias
together (EK-FAC, ``methods/ekfac.py``): which leaves form a layer, found from their names and
shapes alone (so ``Method.check_size`` can refuse a selection before any work), a layer's stacked
gradients as one (in + 1) × out matrix, and per-layer state kept as a tree keyed like the kernels
(the form Orbax saves and restores).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from influence.selection import leaf_paths
from runtime.errors import InputError

FIX = "select the Dense layers (config.params)"


@dataclasses.dataclass(frozen=True)
class Layer:
    """One selected dense layer: its kernel's leaf path, its bias's (None: not selected) and its
    factors' sides: A is fan_in × fan_in (in + 1 with the bias), S fan_out × fan_out."""

    kernel: str
    bias: str | None
    fan_in: int
    fan_out: int


def _sibling(path: str, name: str) -> str:
    parent = path.rpartition("/")[0]
    return f"{parent}/{name}" if parent else name


def layers(selected: Any, name: str) -> list[Layer]:
    """The dense layers of the selected leaves (ShapeDtypeStructs or arrays) of
    ``method.name=name``: every leaf is a 2-D ``kernel`` or the 1-D ``bias`` of a selected one;
    one line naming the leaf and the fix otherwise."""
    shapes = {
        p: tuple(x.shape)
        for p, x in zip(leaf_paths(selected), jax.tree.leaves(selected), strict=True)
    }
    kernels = [p for p, s in shapes.items() if p.rpartition("/")[2] == "kernel" and len(s) == 2]
    if not kernels:
        shown = ", ".join(list(shapes)[:4]) + (", ..." if len(shapes) > 4 else "")
        raise InputError(
            f"method.name={name} preconditions Dense layers, and none of the {len(shapes)} "
            f"selected leaves ({shown}) is a 2-D Dense kernel: {FIX}"
        )
    biases_last = sorted(shapes.items(), key=lambda item: item[0].rpartition("/")[2] == "bias")
    for path, shape in biases_last:  # a conv's kernel is named before its bias
        leaf = path.rpartition("/")[2]
        kernel = shapes.get(_sibling(path, "kernel"), ())
        if not (
            (leaf == "kernel" and len(shape) == 2)
            or (leaf == "bias" and len(shape) == 1 and len(kernel) == 2 and kernel[1] == shape[0])
        ):
            raise InputError(
                f"method.name={name} preconditions Dense layers only (a 2-D kernel, with its bias "
                f"or not); {path} has shape {shape}: {FIX}"
            )
    found = []
    for kernel in kernels:
        bias = _sibling(kernel, "bias")
        bias = bias if bias in shapes else None
        fan_in, fan_out = shapes[kernel]
        found.append(Layer(kernel, bias, fan_in + (bias is not None), fan_out))
    return found


def by_path(tree: Any) -> dict[str, Any]:
    """{leaf path: leaf} of a tree laid out like the selected params (stacked or not)."""
    return dict(zip(leaf_paths(tree), jax.tree.leaves(tree), strict=True))


def layer_grads(flat: dict[str, jax.Array], layer: Layer) -> jax.Array:
    """A layer's stacked gradients (k, fan_in, fan_out) from ``by_path``'s leaves: the kernel's,
    with the bias's as a last row (the gradient of the input column of 1s)."""
    kernel = flat[layer.kernel]
    if layer.bias is None:
        return kernel
    return jnp.concatenate([kernel, flat[layer.bias][..., None, :].astype(kernel.dtype)], axis=-2)


def split_grads(grads: jax.Array, layer: Layer) -> dict[str, jax.Array]:
    """``layer_grads``' inverse: {kernel path: (k, in, out), bias path: (k, out)}."""
    if layer.bias is None:
        return {layer.kernel: grads}
    return {layer.kernel: grads[..., :-1, :], layer.bias: grads[..., -1, :]}


def by_kernel(layout: list[Layer], values: list[Any]) -> dict[str, Any]:
    """A tree of one value per layer, nested like the kernels' paths (the saved state's form)."""
    flat = {tuple(layer.kernel.split("/")): v for layer, v in zip(layout, values, strict=True)}
    return traverse_util.unflatten_dict(flat)


def per_layer(layout: list[Layer], tree: dict[str, Any]) -> list[Any]:
    """``by_kernel``'s inverse: the values in ``layout``'s order."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    return [flat[layer.kernel] for layer in layout]
