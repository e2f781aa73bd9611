"""Vision Transformer (Dosovitskiy et al. 2021) in the layout of google-research/vision_transformer
and big_vision (``big_vision/models/vit.py``): the paper's ViT-B/32 and ViT-L/32 (Schioppa et al.
2022, §5.3: ViT-L/32 fine-tuned on ImageNet, 300M parameters).

Patches by a strided conv (``embedding``), a learned position embedding, a class token (the
original ViT's ``classifier='token'``), pre-LayerNorm encoder blocks
(``Transformer/encoderblock_{i}/{LayerNorm_0,MultiHeadDotProductAttention_1,LayerNorm_2,MlpBlock_3}``),
``Transformer/encoder_norm`` and a zero-initialised ``head``. Parameter names follow that layout, so
"the last blocks" of the paper's Table 6 read ``Transformer/encoderblock_(10|11)/.*|Transformer/
encoder_norm/.*|head/.*``. No dropout: influence needs the deterministic model. No state: a ViT's
params are everything.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        dense = lambda n: nn.Dense(  # noqa: E731
            n,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
        )
        return dense(width)(nn.gelu(dense(self.mlp_dim)(x)))


class Encoder1DBlock(nn.Module):
    mlp_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.LayerNorm(name="LayerNorm_0")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            kernel_init=nn.initializers.xavier_uniform(),
            name="MultiHeadDotProductAttention_1",
        )(y, y)
        x = x + y
        y = nn.LayerNorm(name="LayerNorm_2")(x)
        return x + MlpBlock(self.mlp_dim, name="MlpBlock_3")(y)


class Encoder(nn.Module):
    depth: int
    mlp_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth):
            x = Encoder1DBlock(self.mlp_dim, self.num_heads, name=f"encoderblock_{i}")(x)
        return nn.LayerNorm(name="encoder_norm")(x)


class ViT(nn.Module):
    """Images (n, H, W, C) → logits (n, num_classes); H and W multiples of ``patch_size``."""

    num_classes: int
    patch_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout, no state
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="embedding")(x)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
        x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
        posemb = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, h * w + 1, c))
        x = Encoder(self.depth, self.mlp_dim, self.num_heads, name="Transformer")(x + posemb)
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x[:, 0])


PRESETS: dict[str, dict[str, Any]] = {
    "vit_l32": dict(patch_size=32, width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "vit_b32": dict(patch_size=32, width=768, depth=12, mlp_dim=3072, num_heads=12),
    "vit_ti16": dict(patch_size=16, width=192, depth=12, mlp_dim=768, num_heads=3),
    # 2 CPU cores on 28×28 images: 7×7 patches of 4 pixels.
    "vit_small": dict(patch_size=4, width=64, depth=2, mlp_dim=128, num_heads=4),
    # Tests: jax.hessian over all its parameters fits in memory.
    "vit_tiny": dict(patch_size=7, width=8, depth=1, mlp_dim=16, num_heads=2),
}


def make(preset: str, num_classes: int) -> ViT:
    return ViT(num_classes=num_classes, **PRESETS[preset])
