"""LoRA adapters attached by a Flax interceptor (tasks/lora.py) on a tiny BERT encoder: the
unmerged form equals the merged weights in values, gradients, JVPs and per-example gradients,
alone and under another nn.Dense interceptor, and bad settings are one-line errors."""

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runtime.errors import InputError
from tasks import lora
from tasks.bert import BertConfig, BertEncoder

CONFIG = BertConfig(
    vocab_size=40, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16, max_position=8
)
MODEL = BertEncoder(CONFIG)
TARGETS = r"layer_\d+/(attention/(query|value)|intermediate)"
SCALE = lora.scaling(4.0, 2)


@pytest.fixture(scope="module")
def setup():
    """Base params, adapters with a random B (zero at init: the adapters then change the
    function), inputs with padding, loss weights. Numpy draws: every jax.random call outside jit
    compiles once per shape."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, CONFIG.vocab_size, (3, 6)).astype(np.int32)
    mask = np.ones((3, 6), np.int32)
    mask[0, 4:] = 0
    base = jax.jit(MODEL.init)(jax.random.key(0), ids, mask)["params"]
    adapters = lora.init_adapters(base, TARGETS, 2, jax.random.key(2))
    adapters = jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape, np.float32), adapters)
    weights = rng.standard_normal((6, CONFIG.hidden_size), np.float32)
    return base, adapters, ids, mask, weights


def attached_out(base, adapters, ids, mask):
    with lora.attached(adapters, SCALE):
        return MODEL.apply({"params": base}, ids, mask)


def merged_out(base, adapters, ids, mask):
    return MODEL.apply({"params": lora.merge(base, adapters, SCALE)}, ids, mask)


@functools.partial(jax.jit, static_argnums=0)
def results(out_fn, base, adapters, ids, mask, weights):
    """Through ``out_fn``: the hidden states, the gradient of a loss w.r.t. the base params and
    the adapters, a JVP in the adapters, and per-example adapter gradients under vmap (one
    compiled program for each form: compiling dominates these tests on 2 cores)."""

    def losses(base, adapters, ids, mask):
        return jnp.sum(jnp.tanh(out_fn(base, adapters, ids, mask)) * weights, axis=(-2, -1))

    total = lambda base, adapters: losses(base, adapters, ids, mask).sum()  # noqa: E731
    tangent = jax.tree.map(lambda x: jnp.full_like(x, 0.1), adapters)
    one = lambda a, i, m: losses(base, a, i[None], m[None])[0]  # noqa: E731
    return {
        "out": out_fn(base, adapters, ids, mask),
        "grad": jax.grad(total, argnums=(0, 1))(base, adapters),
        "jvp": jax.jvp(lambda a: total(base, a), (adapters,), (tangent,)),
        "per_example": jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(adapters, ids, mask),
    }


@pytest.fixture(scope="module")
def unmerged(setup):
    return results(attached_out, *setup)


@pytest.fixture(scope="module")
def merged(setup):
    return results(merged_out, *setup)


def close(a, b):
    """Equal to float32 round-off: rtol 1e-5, and 1e-5 of the array's largest entry for entries
    that are sums of cancelling terms."""

    def check(x, y):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * float(np.abs(y).max()) + 1e-7)

    jax.tree.map(check, a, b)


@pytest.mark.slow
def test_init_adapts_the_matched_dense_layers_only(setup):
    base, _, ids, mask, _ = setup
    adapters = lora.init_adapters(base, TARGETS, 3, jax.random.key(2))
    flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
    paths = {"/".join(p.key for p in path[:-1]) for path, _ in flat}
    assert paths == {
        f"layer_{i}/{m}"
        for i in (0, 1)
        for m in ("attention/query", "attention/value", "intermediate")
    }
    a, b = adapters["layer_1"]["intermediate"]["a"], adapters["layer_1"]["intermediate"]["b"]
    assert a.shape == (3, 8) and b.shape == (16, 3) and not b.any()
    assert 0 < np.abs(a).max() <= 1 / np.sqrt(8)  # Kaiming-uniform bound 1/√d_in
    # B = 0: exactly the base model (op by op: one jitted program might fuse the two apart).
    np.testing.assert_array_equal(
        attached_out(base, adapters, ids, mask), MODEL.apply({"params": base}, ids, mask)
    )


@pytest.mark.slow
def test_unmerged_equals_merged(setup, unmerged, merged):
    base, adapters, ids, mask, _ = setup
    assert np.abs(merged["out"] - MODEL.apply({"params": base}, ids, mask)).max() > 1e-2
    close(unmerged["out"], merged["out"])
    close(lora.apply(MODEL, base, adapters, SCALE, ids, mask), merged["out"])


def test_gradients_and_jvps_equal_those_through_merge(unmerged, merged):
    close(unmerged["grad"], merged["grad"])
    close(unmerged["jvp"], merged["jvp"])


def test_per_example_gradients_under_vmap(unmerged, merged):
    close(unmerged["per_example"], merged["per_example"])
    summed = jax.tree.map(lambda g: g.sum(0), unmerged["per_example"])
    close(summed, unmerged["grad"][1])


@functools.partial(jax.jit, static_argnums=0)
def perturbed(order, base, adapters, ids, mask, weights):
    """Value and gradients (w.r.t. the adapters and the perturbations) of a loss where a second
    interceptor adds a perturbation to every Dense output (influence/factorised.py's trick),
    entered before ('lora_inside') or after ('lora_outside') the LoRA one, or on the merged
    params ('merged')."""
    widths = [8, 8, 8, 8, 16, 8]  # per layer: query, key, value, output, intermediate, output
    eps = [jnp.full((1, 6, w), 0.01) for w in widths * CONFIG.num_layers]

    def loss(adapters, eps):
        count = [0]

        def perturb(next_fun, args, kwargs, context):
            if context.method_name != "__call__" or not isinstance(context.module, nn.Dense):
                return next_fun(*args, **kwargs)
            count[0] += 1
            return next_fun(*args, **kwargs) + eps[count[0] - 1]

        params = lora.merge(base, adapters, SCALE) if order == "merged" else base
        contexts = {
            "merged": [nn.intercept_methods(perturb)],
            "lora_inside": [nn.intercept_methods(perturb), lora.attached(adapters, SCALE)],
            "lora_outside": [lora.attached(adapters, SCALE), nn.intercept_methods(perturb)],
        }[order]
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            y = MODEL.apply({"params": params}, ids[:1], mask[:1])
        assert count[0] == len(eps)
        return jnp.sum(jnp.tanh(y[0]) * weights)

    return jax.value_and_grad(loss, argnums=(0, 1))(adapters, eps)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["lora_inside", "lora_outside"])
def test_composes_with_another_dense_interceptor(setup, order):
    close(perturbed(order, *setup), perturbed("merged", *setup))


def test_scaling():
    assert lora.scaling(16, 4) == 4.0
    assert lora.scaling(16, 4, rslora=True) == 8.0
    with pytest.raises(InputError, match="rank=0"):
        lora.scaling(16, 0)


@pytest.mark.parametrize(
    ("targets", "rank", "message"),
    [
        (TARGETS, 0, "LoRA rank=0: it must be an integer of at least 1"),
        (
            TARGETS,
            9,
            r"rank=9 exceeds min\(d_in, d_out\)=8 of layer_0/attention/query \(kernel 8×8\)",
        ),
        (
            "layer_0/attention/qkv",
            2,
            "match no Dense layer's path; the 12 there are: layer_0/attention/key, .*, [.][.][.]$",
        ),
        ("layer_(", 2, r"targets='layer_\(' is not a regular expression"),
        ("embeddings/word_embeddings", 2, "match no Dense layer"),  # an Embed, not a Dense
    ],
)
def test_bad_settings_are_one_line_errors(setup, targets, rank, message):
    base = setup[0]
    with pytest.raises(InputError, match=message) as error:
        lora.init_adapters(base, targets, rank, jax.random.key(0))
    assert "\n" not in str(error.value)


def test_a_non_dense_layer_at_an_adapted_path_is_refused():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(4, name="proj")(x)

    x = jnp.ones((2, 4))
    base = Model().init(jax.random.key(0), x)["params"]
    adapters = lora.init_adapters(base, "proj", 2, jax.random.key(1))
    with pytest.raises(InputError, match=r"nn\.Dense only; proj is DenseGeneral"):
        lora.apply(Model(), base, adapters, 1.0, x)
