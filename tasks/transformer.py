"""The encoder–decoder Transformer of flax examples/wmt (Vaswani et al. 2017), the model of the
paper's translation experiments (Schioppa et al. 2022, §5.2: Transformer Base on WMT17/Paracrawl).

Pre-LayerNorm blocks, sinusoidal position encodings, one embedding shared by source, target and the
output logits (``logits_via_embedding``), token id 0 = padding (masked in every attention). Module
and parameter names follow the flax example (``encoder/encoderblock_3/...``,
``decoder/encoderdecoderblock_5/...``, ``shared_embedding``), so parameter subsets read as the
paper's "last 3 decoder layers": ``params.include='decoder/encoderdecoderblock_[345]/.*'``.
There is no dropout: influence needs the deterministic model, and the train job here has no
per-step RNG (the recipe is ours, not the paper's).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    emb_dim: int = 512
    num_heads: int = 8
    num_layers: int = 6
    qkv_dim: int = 512
    mlp_dim: int = 2048
    max_len: int = 256


PRESETS = {
    # Transformer Base (Vaswani et al. 2017), the paper's model: ~61M parameters at vocab 32k.
    "base": dict(emb_dim=512, num_heads=8, num_layers=6, qkv_dim=512, mlp_dim=2048),
    # Trains on 2 CPU cores in minutes.
    "small": dict(emb_dim=64, num_heads=4, num_layers=2, qkv_dim=64, mlp_dim=128),
    # Tests and the runlocal preset.
    "tiny": dict(emb_dim=16, num_heads=2, num_layers=1, qkv_dim=16, mlp_dim=32),
}


def sinusoidal(max_len: int, dim: int) -> np.ndarray:
    """(max_len, dim) fixed position encodings: sin on the first half, cos on the second."""
    position = np.arange(max_len)[:, None]
    scale = -np.log(10000.0) / (dim // 2 - 1)
    div = np.exp(np.arange(dim // 2) * scale)
    table = np.zeros((max_len, dim), np.float32)
    table[:, : dim // 2] = np.sin(position * div)
    table[:, dim // 2 : 2 * (dim // 2)] = np.cos(position * div)
    return table


def shift_right(x: jax.Array) -> jax.Array:
    """Decoder inputs: the targets one position later, a 0 (padding id, here 'start') first."""
    return jnp.pad(x, ((0, 0), (1, 0)))[:, :-1]


def attention(c: TransformerConfig) -> nn.MultiHeadDotProductAttention:
    """The attention of every block: c.num_heads heads over c.qkv_dim features, no biases, no
    dropout (created inside a block's compact call, so Flax names it there)."""
    return nn.MultiHeadDotProductAttention(
        num_heads=c.num_heads, qkv_features=c.qkv_dim, use_bias=False, deterministic=True
    )


class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.relu(nn.Dense(self.mlp_dim)(x))
        return nn.Dense(x.shape[-1])(y)


class Encoder1DBlock(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        y = nn.LayerNorm()(x)
        y = attention(c)(y, mask=mask)
        x = x + y
        return x + MlpBlock(c.mlp_dim)(nn.LayerNorm()(x))


class EncoderDecoder1DBlock(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(
        self, y: jax.Array, encoded: jax.Array, self_mask: jax.Array, cross_mask: jax.Array
    ) -> jax.Array:
        c = self.config
        z = nn.LayerNorm()(y)
        z = attention(c)(z, mask=self_mask)
        y = y + z
        z = nn.LayerNorm()(y)
        z = attention(c)(z, encoded, mask=cross_mask)
        y = y + z
        return y + MlpBlock(c.mlp_dim)(nn.LayerNorm()(y))


class Encoder(nn.Module):
    config: TransformerConfig
    embed: nn.Embed

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        c = self.config
        x = self.embed(inputs) + sinusoidal(c.max_len, c.emb_dim)[None, : inputs.shape[1]]
        mask = nn.make_attention_mask(inputs > 0, inputs > 0)
        for i in range(c.num_layers):
            x = Encoder1DBlock(c, name=f"encoderblock_{i}")(x, mask)
        return nn.LayerNorm(name="encoder_norm")(x)


class Decoder(nn.Module):
    config: TransformerConfig
    embed: nn.Embed

    @nn.compact
    def __call__(self, encoded: jax.Array, inputs: jax.Array, targets: jax.Array) -> jax.Array:
        c = self.config
        decoder_in = shift_right(targets)
        y = self.embed(decoder_in) + sinusoidal(c.max_len, c.emb_dim)[None, : targets.shape[1]]
        # Position 0 holds the start token (id 0), so the padding mask comes from the targets.
        self_mask = nn.combine_masks(
            nn.make_attention_mask(targets > 0, targets > 0), nn.make_causal_mask(targets)
        )
        cross_mask = nn.make_attention_mask(targets > 0, inputs > 0)
        for i in range(c.num_layers):
            y = EncoderDecoder1DBlock(c, name=f"encoderdecoderblock_{i}")(
                y, encoded, self_mask, cross_mask
            )
        y = nn.LayerNorm(name="encoderdecoder_norm")(y)
        return self.embed.attend(y) / jnp.sqrt(c.emb_dim)  # logits via the shared embedding


class Transformer(nn.Module):
    """(inputs, targets) token ids (batch, length), 0 = padding → (batch, length, vocab) logits
    of each target token given the source and the previous target tokens (teacher forcing)."""

    config: TransformerConfig

    def setup(self) -> None:
        c = self.config
        self.shared_embedding = nn.Embed(
            c.vocab_size, c.emb_dim, embedding_init=nn.initializers.normal(stddev=1.0)
        )
        self.encoder = Encoder(c, self.shared_embedding)
        self.decoder = Decoder(c, self.shared_embedding)

    def __call__(self, inputs: jax.Array, targets: jax.Array) -> jax.Array:
        return self.decoder(self.encoder(inputs), inputs, targets)

    def encode(self, inputs: jax.Array) -> jax.Array:
        return self.encoder(inputs)

    def decode(self, encoded: jax.Array, inputs: jax.Array, targets: jax.Array) -> jax.Array:
        return self.decoder(encoded, inputs, targets)
