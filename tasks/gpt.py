"""A decoder-only Transformer language model (GPT-2's layout: Radford et al. 2019), for the
language-model workload (``tasks/lm.py``).

Pre-LayerNorm blocks of causal self-attention and a GELU MLP, learned position embeddings, a final
LayerNorm, logits through the token embedding (tied, as GPT-2). Token id 0 is padding and also the
start token the first position reads (``shift_right``, as the translation decoder): padding is
masked in every attention. There is no dropout: influence needs the deterministic model.

Parameter names read as the blocks' roles, so parameter subsets are regexes over them:
``block_3/attention/query/kernel``, ``block_3/mlp/fc_in/kernel``, ``block_3/mlp/fc_out/kernel``,
``token_embedding/embedding``. The MLP's two layers are plain ``nn.Dense`` (2-D kernels: what a
Kronecker-factored method such as EK-FAC needs); attention's projections are ``DenseGeneral``
(3-D kernels, heads split out).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from tasks.transformer import shift_right


@dataclasses.dataclass(frozen=True)
class GptConfig:
    vocab_size: int
    emb_dim: int = 768
    num_heads: int = 12
    num_layers: int = 12
    mlp_dim: int = 3072
    max_len: int = 1024


PRESETS = {
    # GPT-2 small (124M parameters at GPT-2's vocabulary of 50,257; 85M in the blocks).
    "base": dict(emb_dim=768, num_heads=12, num_layers=12, mlp_dim=3072),
    # Learns the corpus's structure on 2 CPU cores in minutes (0.8M parameters in the blocks).
    "small": dict(emb_dim=128, num_heads=4, num_layers=4, mlp_dim=512),
    # Tests and the runlocal preset.
    "tiny": dict(emb_dim=32, num_heads=2, num_layers=2, mlp_dim=64),
}


class Mlp(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.gelu(nn.Dense(self.mlp_dim, name="fc_in")(x))
        return nn.Dense(x.shape[-1], name="fc_out")(y)


class Block(nn.Module):
    config: GptConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        y = nn.MultiHeadDotProductAttention(
            num_heads=c.num_heads, deterministic=True, name="attention"
        )(nn.LayerNorm(name="norm_attention")(x), mask=mask)
        x = x + y
        return x + Mlp(c.mlp_dim, name="mlp")(nn.LayerNorm(name="norm_mlp")(x))


class Gpt(nn.Module):
    """tokens (batch, length), 0 = padding → (batch, length, vocab) logits of each token given
    the tokens before it (teacher forcing: the model reads the tokens shifted right)."""

    config: GptConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        embed = nn.Embed(
            c.vocab_size,
            c.emb_dim,
            embedding_init=nn.initializers.normal(stddev=0.02),
            name="token_embedding",
        )
        positions = self.param(
            "position_embedding", nn.initializers.normal(stddev=0.01), (c.max_len, c.emb_dim)
        )
        x = embed(shift_right(tokens)) + positions[None, : tokens.shape[1]]
        # Position 0 reads the start token (id 0), so the padding mask comes from the tokens.
        mask = nn.combine_masks(
            nn.make_attention_mask(tokens > 0, tokens > 0), nn.make_causal_mask(tokens)
        )
        for i in range(c.num_layers):
            x = Block(c, name=f"block_{i}")(x, mask)
        return embed.attend(nn.LayerNorm(name="final_norm")(x))


def num_params(params: object) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


def greedy_continue(model: Gpt, params, tokens: jax.Array, lengths: jax.Array, steps: int):
    """Greedy continuation: ``tokens`` (batch, length) holds each prompt in its first
    ``lengths[i]`` positions (0 after); the next ``steps`` tokens are argmax picks, written in
    place (the model re-reads the prefix at each step: prompts are short, no cache needed).
    Positions past the array's length are not generated."""
    length = tokens.shape[1]

    def body(step: int, tokens: jax.Array) -> jax.Array:
        t = jnp.minimum(lengths + step, length - 1)
        # The token at t is a placeholder (UNK-like, nonzero) so t is not masked as padding; the
        # model reads only the tokens before t there.
        rows = jnp.arange(tokens.shape[0])
        probe = tokens.at[rows, t].set(jnp.where(lengths + step < length, 2, tokens[rows, t]))
        logits = model.apply({"params": params}, probe)
        token = jnp.argmax(logits[rows, t], axis=-1).astype(tokens.dtype)
        keep = lengths + step < length
        return tokens.at[rows, t].set(jnp.where(keep, token, tokens[rows, t]))

    return jax.lax.fori_loop(0, steps, body, tokens)
