"""The factorised reverse mode (influence/factorised.py) gives forward mode's projections (rtol
1e-4) on every model family the project ships, with a parameter subset, and with a layer called
twice; models or layers it does not model take the plain per-example-gradient route."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influence import factorised, scoring
from influence.selection import Selection
from tasks import mnist, resnet, vision, vit


class Tied(nn.Module):
    """One dense layer applied twice, a conv with explicit padding, a dilated conv (not modelled:
    plain route) and a LayerNorm (plain route)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = nn.Conv(3, (3, 3), padding=((1, 0), (2, 1)))(x)
        x = nn.Conv(2, (2, 2), kernel_dilation=2)(x)
        x = nn.LayerNorm()(x.reshape(x.shape[0], -1))
        shared = nn.Dense(x.shape[-1])
        return nn.Dense(3)(jnp.tanh(shared(jnp.tanh(shared(x)))))


def _check(loss, variables, batch, selection=None) -> None:
    vectors = selection.select(variables) if selection else variables
    leaves, treedef = jax.tree.flatten(vectors)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    eigvecs = jax.tree.unflatten(
        treedef, [jax.random.normal(k, (5, *x.shape)) for k, x in zip(keys, leaves, strict=True)]
    )
    want = np.asarray(
        jax.jit(scoring.make_forward_products(loss, None, selection))(variables, eigvecs, batch)
    )
    got = np.asarray(
        jax.jit(factorised.make_factorised_products(loss, selection))(variables, eigvecs, batch)
    )
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def _images(n: int, size: int, classes: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        "image": jnp.asarray(rng.normal(size=(n, size, size, 1)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, classes, n)),
    }


@pytest.mark.slow
@pytest.mark.parametrize("model", ["small_cnn", "flax_cnn"])
def test_mnist_cnns(model: str) -> None:
    """Strided VALID and SAME convs, dense heads."""
    task = mnist.make_task(model)
    _check(task.per_example_loss, task.init_params(jax.random.key(0)), _images(6, 28, 10))


@pytest.mark.slow
@pytest.mark.parametrize(
    "model",
    [
        resnet.ResNet(
            num_classes=3,
            stage_sizes=(1, 1),
            block_cls=resnet.ResNetBlock,
            num_filters=2,
            small_inputs=True,
        ),
        vit.ViT(num_classes=3, patch_size=4, width=8, depth=1, mlp_dim=8, num_heads=2),
        Tied(),
    ],
    ids=["resnet", "vit", "tied"],
)
def test_vision_models(model: nn.Module) -> None:
    """BatchNorm statistics held fixed and bias-free convs (ResNet), dense layers over tokens and
    a patch-embedding conv (ViT), a dense layer called twice and layers on the plain route."""
    classifier = vision.Classifier(model, (8, 8, 1))
    variables = classifier.init_params(jax.random.key(0))
    noise = jax.random.split(jax.random.key(3), len(jax.tree.leaves(variables["params"])))
    leaves, treedef = jax.tree.flatten(variables["params"])
    params = [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(noise, leaves, strict=True)]
    variables = {**variables, "params": jax.tree.unflatten(treedef, params)}
    selection = Selection.build(variables, ".*", state=classifier.state)
    _check(classifier.per_example_loss, variables, _images(6, 8, 3), selection)


def test_parameter_subset() -> None:
    """Only the last dense layer's kernel selected: the others are held fixed."""
    task = mnist.make_task("flax_cnn")
    params = task.init_params(jax.random.key(0))
    selection = Selection.build(params, r".*Dense_1/kernel")
    _check(task.per_example_loss, params, _images(4, 28, 10), selection)
