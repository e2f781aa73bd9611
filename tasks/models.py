"""The two MNIST models of Schioppa et al. (2022), §5.1.

- ``KohLiangCNN``: the small convolutional network of Koh & Liang (2017), smooth (tanh) activations
  so the Hessian is well defined everywhere, trained with L2 regularisation; 2,410 parameters, small
  enough that the exact Hessian (2,410²) fits in memory and validates Arnoldi.
- ``FlaxMnistCNN``: the CNN of the Flax MNIST example (two 3×3 conv layers, 32 and 64 channels,
  average pooling, a 256-unit dense layer); 824,458 parameters.
- ``SoftmaxRegression``: multinomial logistic regression on the pixels (7,850 parameters). With
  L2 its loss is strictly convex, so a leave-one-out retrain has one answer to compare influence
  against (``benchmarks/loo.py``).
"""

import flax.linen as nn
import jax


class KohLiangCNN(nn.Module):
    """Conv(4, 5×5, stride 2) → tanh → Conv(8, 3×3, stride 2) → tanh → Dense(10)."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.tanh(nn.Conv(4, (5, 5), strides=(2, 2), padding="VALID")(x))
        x = nn.tanh(nn.Conv(8, (3, 3), strides=(2, 2), padding="VALID")(x))
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class FlaxMnistCNN(nn.Module):
    """The CNN of flax/examples/mnist/train.py."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(64, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(256)(x.reshape((x.shape[0], -1))))
        return nn.Dense(self.num_classes)(x)


class SoftmaxRegression(nn.Module):
    """Dense(10) on the flattened image, logits = x W + b; ``pool`` > 1 first averages
    pool × pool pixel blocks (14 × 14 inputs, 1,970 params at pool=2: the leave-one-out test's
    size)."""

    num_classes: int = 10
    pool: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pool > 1:
            x = nn.avg_pool(x, (self.pool, self.pool), strides=(self.pool, self.pool))
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


MODELS: dict[str, type[nn.Module]] = {
    "small_cnn": KohLiangCNN,
    "flax_cnn": FlaxMnistCNN,
    "softmax": SoftmaxRegression,
}
