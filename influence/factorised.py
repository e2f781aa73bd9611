"""Reverse-mode projections g = G∇ℓ(x) without forming per-example gradients of dense and conv
layers: the per-layer factorised form (Alg. 1, line 21, computed another way).

For a layer y = x W + b applied at T positions of one example (T = 1 for an MLP's dense layer,
the tokens of a Transformer, the pixels of a conv through its patches), with input x (T × in) and
the loss's output cotangent δ = ∂ℓ/∂y (T × out),

    ∇_W ℓ = Σ_t x_t δ_tᵀ,   ∇_b ℓ = Σ_t δ_t,   so   ⟨∇_W ℓ, V_k⟩ = Σ_t x_tᵀ V_k δ_t.

With T = 1 the projection is (x V_k)·δ for all k at once, and the in × out per-example gradient is
never formed (it is most of a dense model's memory traffic: 250 × 803k values per batch for the
Flax CNN); with T > 1, forming Σ_t x_t δ_tᵀ per layer first is cheaper than T products with every
V_k, and a conv's x_t are its input patches (``lax.conv_general_dilated_patches``). x and δ come
from one vmapped backward pass: a Flax interceptor (``nn.intercept_methods``) records each dense or
conv call's input and adds a zero to its output, whose gradient is δ. Every other selected leaf
(embeddings, norms, layers of another kind or with options this form does not model) takes the
plain route: its per-example gradient from the same pass, then the GEMM with G.

Only ``flax.linen`` ``nn.Dense`` and 2-D ``nn.Conv`` (exactly those classes, no ``dot_general``
override, no dilation, one feature group, padding 'SAME', 'VALID' or explicit pairs) are
factorised; a model without them (pure JAX) gets the plain reverse mode, the same numbers.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from influence.selection import Selection, restricted
from influence.types import Batch, Params, PerExampleLoss

Products = Any  # (params, eigvecs, batch) -> (batch, p̃); influence.scoring.Products


@dataclasses.dataclass(frozen=True)
class _Call:
    """One dense or conv call of the forward pass, in call order."""

    index: int  # position among all intercepted calls
    module: nn.Module
    kernel: str  # slash path of its kernel leaf in the differentiated tree
    bias: str | None


def _padding(module: nn.Conv) -> str | tuple[tuple[int, int], ...] | None:
    """The conv's padding as ``lax`` takes it, or None where this form does not model it."""
    padding = module.padding
    if isinstance(padding, str):
        return padding if padding in ("SAME", "VALID") else None
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    pairs = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    return pairs if len(pairs) == 2 else None


def _supported(module: nn.Module) -> bool:
    if type(module) is nn.Dense:
        return module.dot_general is None and module.dot_general_cls is None
    if type(module) is nn.Conv:
        ones = (None, 1, (1, 1), [1, 1])
        return (
            not isinstance(module.kernel_size, int)
            and len(module.kernel_size) == 2
            and module.feature_group_count == 1
            and module.kernel_dilation in ones
            and module.input_dilation in ones
            and module.mask is None
            and module.conv_general_dilated is None
            and module.conv_general_dilated_cls is None
            and _padding(module) is not None
        )
    return False


def _leaf(paths: set[str], module: nn.Module, name: str) -> str | None:
    """The differentiated leaf that is ``module``'s parameter ``name`` (in a variables dict,
    under its 'params' collection), if any."""
    key = "/".join((*module.path, name))
    return next((p for p in (key, f"params/{key}") if p in paths), None)


def _calls(
    loss: PerExampleLoss, primal: Params, one: Batch, paths: set[str]
) -> tuple[list[_Call], list[jax.ShapeDtypeStruct]]:
    """The forward pass's factorisable calls whose kernel is differentiated, and each one's output
    shape on a batch of one (traced abstractly, through a fresh function: a cached trace would
    not run the interceptor)."""
    seen: list[_Call] = []
    shapes: list[jax.ShapeDtypeStruct] = []
    count = [0]

    def record(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, nn.Dense | nn.Conv):
            return next_fun(*args, **kwargs)
        index, count[0] = count[0], count[0] + 1
        out = next_fun(*args, **kwargs)
        module = context.module
        kernel = _leaf(paths, module, "kernel")
        if kernel is not None and _supported(module):
            bias = _leaf(paths, module, "bias") if module.use_bias else None
            seen.append(_Call(index, module.clone(parent=None), kernel, bias))
            shapes.append(jax.ShapeDtypeStruct(out.shape, out.dtype))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda p, b: loss(p, b), primal, one)
    return seen, shapes


def _patches(module: nn.Conv, x: jax.Array) -> jax.Array:
    """(B, H', W', C·kh·kw) input patches of a 2-D conv, feature order (C, kh, kw)."""
    strides = module.strides or 1
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    return jax.lax.conv_general_dilated_patches(
        x,
        tuple(module.kernel_size),
        strides,
        _padding(module),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _project_call(
    call: _Call, x: jax.Array, delta: jax.Array, v_kernel: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(B, p̃) ⟨∇_W ℓ, V_k⟩ of one call from its inputs x and output cotangents δ (batch first),
    and (B,) ‖∇_W ℓ‖²: ‖x‖²‖δ‖² for one position, else of the per-example matrix formed anyway."""
    b = x.shape[0]
    if isinstance(call.module, nn.Conv):
        patches = _patches(call.module, x.reshape(b * x.shape[1], *x.shape[2:]))
        kh, kw, cin, cout = v_kernel.shape[1:]
        per_example = jnp.einsum(
            "btf,bto->bfo", patches.reshape(b, -1, patches.shape[-1]), delta.reshape(b, -1, cout)
        )
        per_example = per_example.reshape(b, cin, kh, kw, cout).transpose(0, 2, 3, 1, 4)
        return jnp.einsum("bhwio,khwio->bk", per_example, v_kernel), _sqnorm(per_example)
    cin, cout = v_kernel.shape[1:]
    x, delta = x.reshape(b, -1, cin), delta.reshape(b, -1, cout)
    if x.shape[1] == 1:  # (x V_k)·δ: no in × out matrix per example
        g = jnp.einsum("bko,bo->bk", jnp.einsum("bi,kio->bko", x[:, 0], v_kernel), delta[:, 0])
        return g, _sqnorm(x) * _sqnorm(delta)
    per_example = jnp.einsum("bti,bto->bio", x, delta)
    return jnp.einsum("bio,kio->bk", per_example, v_kernel), _sqnorm(per_example)


def _sqnorm(rows: jax.Array) -> jax.Array:
    """(B,) squared norms of batch-first rows."""
    return jnp.sum(jnp.square(rows.reshape(rows.shape[0], -1)), axis=1)


def make_factorised_products(
    per_example_loss: PerExampleLoss,
    selection: Selection | None = None,
    vary: Callable[[jax.Array], jax.Array] | None = None,
    sqnorm: bool = False,
) -> Products:
    """``project(params, eigvecs, batch) -> (batch_size, p̃)``: reverse mode's projections, the
    dense and conv layers' in the factorised form above (the same numbers to float32 round-off).

    ``sqnorm``: one more column, ‖∇ℓ(x)‖² over the selected leaves (what the tail term of
    ``influence.scoring`` needs), from the same pass; ``eigvecs`` may then have no rows.

    ``vary``, inside ``shard_map``: marks the differentiated inputs (the params and the zero
    perturbations) as varying over the devices, else shard_map's autodiff would sum their
    gradients over the devices."""
    vary = vary or (lambda x: x)

    def project(params: Params, eigvecs: Params, batch: Batch) -> jax.Array:
        loss, primal = restricted(per_example_loss, jax.tree.map(vary, params), selection)
        flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(primal).items()}
        flat_v = {"/".join(k): v for k, v in traverse_util.flatten_dict(eigvecs).items()}
        one = lambda ex: jax.tree.map(lambda x: x[None], ex)  # noqa: E731
        first = jax.tree.map(lambda x: x[0], batch)
        calls, outputs = _calls(loss, primal, one(first), set(flat))
        factorised = {c.kernel for c in calls} | {c.bias for c in calls if c.bias}
        rest = {p: v for p, v in flat.items() if p not in factorised}
        example_loss = _perturbed_loss(loss, flat, calls, one)
        eps = [vary(jnp.zeros(s.shape, s.dtype)) for s in outputs]
        grad = jax.grad(example_loss, argnums=(0, 1), has_aux=True)
        (deltas, rest_grads), inputs = jax.vmap(grad, in_axes=(None, None, 0))(eps, rest, batch)
        rows = jax.tree.leaves(batch)[0].shape[0]
        g, norms = _products(calls, inputs, deltas, rest_grads, flat_v, rows)
        if sqnorm:
            g = jnp.concatenate([g, norms[:, None]], axis=1)
        return jnp.asarray(g, jnp.float32)

    return project


@dataclasses.dataclass(frozen=True)
class Record:
    """One factorised call's per-example statistics: its kernel and bias leaves (slash paths in
    the differentiated tree; bias None when not differentiated), whether it is an ``nn.Dense``,
    its inputs x (B, T, in) and output gradients δ = ∂ℓ/∂y (B, T, out), positions flattened (a
    conv's x are its raw NHWC inputs, not patches)."""

    kernel: str
    bias: str | None
    dense: bool
    inputs: jax.Array
    deltas: jax.Array


def make_layer_records(
    per_example_loss: PerExampleLoss,
    selection: Selection | None = None,
    vary: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[Params, Batch], list[Record]]:
    """``records(params, batch) -> [Record]``, one per factorised call of the forward pass whose
    kernel is selected, in call order: the layer inputs and output gradients from which K-FAC's
    factors E[x xᵀ] and E[δ δᵀ] are formed (``methods/ekfac.py``), from the same single vmapped
    backward pass as the projections above, never a per-example gradient. ``vary`` as there."""
    vary = vary or (lambda x: x)

    def records(params: Params, batch: Batch) -> list[Record]:
        loss, primal = restricted(per_example_loss, jax.tree.map(vary, params), selection)
        flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(primal).items()}
        one = lambda ex: jax.tree.map(lambda x: x[None], ex)  # noqa: E731
        calls, outputs = _calls(loss, primal, one(jax.tree.map(lambda x: x[0], batch)), set(flat))
        example_loss = _perturbed_loss(loss, flat, calls, one)
        eps = [vary(jnp.zeros(s.shape, s.dtype)) for s in outputs]
        grad = jax.grad(example_loss, has_aux=True)
        deltas, inputs = jax.vmap(grad, in_axes=(None, None, 0))(eps, {}, batch)
        rows = jax.tree.leaves(batch)[0].shape[0]
        return [
            Record(
                c.kernel,
                c.bias,
                isinstance(c.module, nn.Dense),
                x.reshape(rows, -1, x.shape[-1]),
                d.reshape(rows, -1, d.shape[-1]),
            )
            for c, x, d in zip(calls, inputs, deltas, strict=True)
        ]

    return records


def _perturbed_loss(loss: Callable, flat: dict, calls: list, one: Callable) -> Callable:
    """(ε per factorised call, the other leaves, one example) → (its loss with each call's output
    shifted by its ε, each call's input): ∂ℓ/∂ε is the output gradient of that call."""
    by_index = {c.index: i for i, c in enumerate(calls)}

    def example_loss(eps: list, rest: dict, example: Batch) -> tuple[jax.Array, list]:
        inputs: list = [None] * len(calls)
        count = [0]

        def perturb(next_fun, args, kwargs, context):
            if context.method_name != "__call__" or not isinstance(
                context.module, nn.Dense | nn.Conv
            ):
                return next_fun(*args, **kwargs)
            index, count[0] = count[0], count[0] + 1
            out = next_fun(*args, **kwargs)
            if index not in by_index:
                return out
            inputs[by_index[index]] = args[0]
            return out + eps[by_index[index]]

        tree = traverse_util.unflatten_dict(
            {tuple(p.split("/")): v for p, v in {**flat, **rest}.items()}
        )
        with nn.intercept_methods(perturb):
            value = loss(tree, one(example))[0]
        return value, inputs

    return example_loss


def _products(
    calls: list, inputs: list, deltas: list, rest_grads: dict, flat_v: dict, rows: int
) -> tuple[jax.Array, jax.Array]:
    """((rows, p̃) products with the eigenvectors, (rows,) ‖∇ℓ(x)‖²): the plain gradients of the
    other leaves, and each factorised call's from its inputs and output gradients."""
    num_vectors = next(iter(flat_v.values())).shape[0]
    g, norms = jnp.zeros((rows, num_vectors)), jnp.zeros((rows,))
    for p, gr in rest_grads.items():
        flat_g = gr.reshape(gr.shape[0], -1)
        g = g + jnp.tensordot(flat_g, flat_v[p].reshape(num_vectors, flat_g.shape[1]), (1, 1))
        norms = norms + _sqnorm(flat_g)
    for call, x, delta in zip(calls, inputs, deltas, strict=True):
        projected, sq = _project_call(call, x, delta, flat_v[call.kernel])
        g, norms = g + projected, norms + sq
        if call.bias:
            sums = delta.reshape(delta.shape[0], -1, delta.shape[-1]).sum(1)
            g, norms = g + sums @ flat_v[call.bias].T, norms + _sqnorm(sums)
    return g, norms
