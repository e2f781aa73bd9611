"""ResNet (He et al. 2016) in the layout of flax examples/imagenet/models.py: the paper's ResNet50
(Schioppa et al. 2022, §5.3, Table 6, Figure 3).

BatchNorm keeps its running statistics in the ``batch_stats`` collection. They are model *state*,
not parameters: training updates them from batch moments (``train=True``), influence treats them
as constants and differentiates only ``params`` with the statistics fixed (``train=False``), as the
paper does. The tasks hand the pipeline ``{'params': ..., 'batch_stats': ...}`` and mark
``batch_stats/.*`` as state (``tasks/base.Task.state``).

Presets: ``resnet50`` (25,557,032 params at 1,000 classes) and ``resnet18`` (11,689,512) with the
ImageNet stem (7×7 stride-2 conv + max-pool); ``resnet_small`` and ``resnet_tiny`` for 2 CPU cores
and tests, with the CIFAR stem (3×3 stride-1 conv, no pool) that suits 28–32 pixel images.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any


def _shortcut(block: nn.Module, residual: jax.Array, y: jax.Array) -> jax.Array:
    """The block's input, projected (1×1 conv + BatchNorm) where its shape differs from the
    output's; called inside the block's compact ``__call__``, so the layers are the block's."""
    if residual.shape == y.shape:
        return residual
    residual = block.conv(y.shape[-1], (1, 1), block.strides, name="conv_proj")(residual)
    return block.norm(name="norm_proj")(residual)


class ResNetBlock(nn.Module):
    """Two 3×3 convolutions (ResNet18/34); the last BatchNorm scale starts at 0 (identity block)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.act(self.norm()(y))
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        return self.act(_shortcut(self, residual, y) + y)


class BottleneckResNetBlock(nn.Module):
    """1×1 → 3×3 → 1×1 (×4 channels) convolutions (ResNet50 and up)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        y = self.act(self.norm()(self.conv(self.filters, (1, 1))(x)))
        y = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
        y = self.conv(self.filters * 4, (1, 1))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    """``__call__(x, train)``: with ``train=True`` BatchNorm normalises by the batch moments and
    updates ``batch_stats`` (apply with ``mutable=['batch_stats']``); with ``train=False`` it uses
    the running averages, so each example's output depends on that example only."""

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    num_filters: int = 64
    small_inputs: bool = False  # the CIFAR stem: 3×3 stride-1 conv, no max-pool
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=False)
        norm = functools.partial(
            nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5
        )
        if self.small_inputs:
            x = conv(self.num_filters, (3, 3), name="conv_init")(x)
            x = nn.relu(norm(name="bn_init")(x))
        else:
            x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(
                x
            )
            x = nn.relu(norm(name="bn_init")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(
                    self.num_filters * 2**i, conv=conv, norm=norm, act=self.act, strides=strides
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


PRESETS: dict[str, dict[str, Any]] = {
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), block_cls=BottleneckResNetBlock),
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock),
    # 2 CPU cores: three stages of one block, 16/32/64 channels.
    "resnet_small": dict(
        stage_sizes=(1, 1, 1), block_cls=ResNetBlock, num_filters=16, small_inputs=True
    ),
    # Tests: jax.hessian over all its parameters fits in memory.
    "resnet_tiny": dict(
        stage_sizes=(1, 1), block_cls=ResNetBlock, num_filters=4, small_inputs=True
    ),
}


def make(preset: str, num_classes: int) -> ResNet:
    return ResNet(num_classes=num_classes, **PRESETS[preset])
