"""Image classification with flipped labels at the paper's model sizes: ResNet and ViT on
ImageNet-format data (Schioppa et al. 2022, §5.3: mislabeled ImageNet examples found by
self-influence, Table 6 and Figure 3).

Data, ``config.data.source``:
- ``fashion_mnist``: Fashion-MNIST (Xiao et al. 2017), 60,000 + 10,000 real 28×28 grayscale
  images in 10 classes, read from the IDX files of Debian's ``dataset-fashion-mnist``
  (``data.dir``, default /usr/share/datasets/fashion-mnist; ``apt-get install
  dataset-fashion-mnist``). Offline, so it is the dataset of the CPU presets.
- ``tfds:<builder_dir>``: any prepared TFDS dataset in ArrayRecord format with an ``image``
  (H, W, C uint8, any size; JPEG decoded record by record) and a ``label`` ClassLabel feature:
  ``imagenet2012`` as TFDS prepares it from the two manual-download tars (configs/vision.py).
Splits: ``data.num_train`` examples of ``data.train_split`` and ``data.num_eval`` of
``data.eval_split``, chosen by ``config.seed`` (0: the whole split); an example's id is its row in
its split. A seeded ``data.flip_fraction`` of the training labels is flipped to another class.

Every stage sees the same per-example preprocessing: the shorter side resized to
image_size · 8/7 and a central image_size crop (big_vision's ``resize_small|central_crop``;
images already image_size × image_size are left as they are), values in [-1, 1]. Only the train
job augments (``data.augment``): a random crop of the image padded by image_size/8 and a random
horizontal flip, seeded per example by (seed, step, position), so a resumed run repeats them.

ResNet's BatchNorm statistics are state (``Task.state``): updated by the train job, constants
for influence. Parameter paths start with the collection: ``params/Dense_0/kernel``,
``params/Transformer/encoderblock_11/...``, ``batch_stats/bn_init/mean``.
"""

import dataclasses
import gzip
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from tasks import mnist, resnet, vit
from tasks.base import Task
from tasks.sources import (
    ArraySource,
    Columns,
    DataError,
    MappedSource,
    Source,
    TfdsSource,
    tfds_location,
)

FASHION_MNIST = "fashion_mnist"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}
MODELS = sorted({*resnet.PRESETS, *vit.PRESETS})
STATE = r"batch_stats/.*"


def read_idx(path: epath.Path) -> np.ndarray:
    """An IDX array (LeCun's MNIST format: magic 0x0000 type ndim, big-endian uint32 dims, data),
    gzipped or not; only unsigned bytes (type 0x08), the type of every (Fashion-)MNIST file."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims}, the file holds {data.size} values")
    return data.reshape(dims)


def fashion_mnist(directory: str, split: str) -> ArraySource:
    """One split ('train' or 'test') of Fashion-MNIST from its IDX files, as (n, 28, 28, 1)."""
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"Fashion-MNIST has splits {sorted(FASHION_MNIST_FILES)}, not {split!r}")
    root = epath.Path(directory or FASHION_MNIST_DIR)
    stem = FASHION_MNIST_FILES[split]
    arrays = {}
    for column, kind in (("image", "images-idx3"), ("label", "labels-idx1")):
        names = [f"{stem}-{kind}-ubyte.gz", f"{stem}-{kind}-ubyte"]
        found = [root / n for n in names if (root / n).exists()]
        if not found:
            raise DataError(
                f"Fashion-MNIST file {root / names[0]} is missing; install it with "
                "`apt-get install dataset-fashion-mnist` or set data.dir to a directory holding "
                "the four IDX files"
            )
        arrays[column] = read_idx(found[0])
    images, labels = arrays["image"], arrays["label"]
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"Fashion-MNIST in {root}: images {images.shape}, labels {labels.shape}")
    return ArraySource({"image": images[..., None], "label": labels.astype(np.int64)})


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, C) → float32 (size, size, C) in [-1, 1]: resize_small(size·8/7) and a central
    crop unless the image already has the size."""
    if image.ndim != 3:
        raise DataError(
            f"an image has shape {image.shape}; the task needs (height, width, channels)"
        )
    if image.shape[:2] != (size, size):
        from PIL import Image  # imported lazily: only ImageNet-sized data needs it

        h, w, c = image.shape
        short = round(size * 8 / 7)
        scale = short / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        pil = Image.fromarray(image[..., 0] if c == 1 else image)
        image = np.asarray(pil.resize((nw, nh), Image.BILINEAR)).reshape(nh, nw, c)
        top, left = (nh - size) // 2, (nw - size) // 2
        image = image[top : top + size, left : left + size]
    return image.astype(np.float32) / 127.5 - 1.0


def augment(columns: Columns, seeds: np.ndarray) -> Columns:
    """Random crop of the image padded by size/8 (edge values) and a random horizontal flip, the
    randomness of example i drawn from ``seeds[i]``."""
    images = columns["image"]
    n, h, w, _ = images.shape
    pad = max(1, h // 8)
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    out = np.empty_like(images)
    for i in range(n):
        rng = np.random.default_rng(int(seeds[i]))
        dy, dx = rng.integers(0, 2 * pad + 1, size=2)
        crop = padded[i, dy : dy + h, dx : dx + w]
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return {**columns, "image": out}


def open_split(source: str, directory: str, split: str, size: int) -> tuple[Source, int]:
    """(examples with 'image' preprocessed to ``size`` and an int 'label', number of classes)."""
    if source == FASHION_MNIST:
        base, num_classes = fashion_mnist(directory, split), 10
    elif (location := tfds_location(source)) is not None:
        builder_dir, _ = location
        base = TfdsSource(builder_dir, split, record_fn=lambda r: _record(r, size))
        num_classes = _check_features(base.info.features, builder_dir)
        return base, num_classes
    else:
        raise DataError(
            f"data.source={source!r} is neither {FASHION_MNIST!r} nor 'tfds:<builder_dir>' "
            "(a prepared ArrayRecord TFDS dataset with 'image' and 'label' features)"
        )

    def prepare(columns: Columns, _: np.ndarray) -> Columns:
        return {
            "image": np.stack([preprocess(x, size) for x in columns["image"]]),
            "label": columns["label"],
        }

    return MappedSource(base, np.arange(base.num_examples), prepare), num_classes


def _check_features(features: Any, where: str) -> int:
    """The number of classes; a dataset without an image of rank 3 and a ClassLabel 'label' is a
    one-line DataError."""
    import tensorflow_datasets as tfds

    keys = set(features.keys())
    if not {"image", "label"} <= keys:
        raise DataError(
            f"TFDS dataset {where} has features {sorted(keys)}; the vision task needs 'image' "
            "and 'label'"
        )
    image, label = features["image"], features["label"]
    if not isinstance(image, tfds.features.Image) or len(image.shape) != 3:
        raise DataError(
            f"TFDS dataset {where}: feature 'image' is {image!r}; the vision task needs an "
            "Image of shape (height, width, channels)"
        )
    if not isinstance(label, tfds.features.ClassLabel):
        raise DataError(f"TFDS dataset {where}: feature 'label' is {label!r}, not a ClassLabel")
    return int(label.num_classes)


def _record(record: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    return {
        "image": preprocess(np.asarray(record["image"]), size),
        "label": np.asarray(record["label"], np.int64),
    }


def subset(base: Source, count: int, seed: int, what: str) -> np.ndarray:
    """``count`` rows of ``base`` chosen by ``seed`` (0: all, in order)."""
    total = base.num_examples
    if count == 0:
        return np.arange(total)
    if not 0 < count <= total:
        raise DataError(f"data.{what}={count} must be in [0, {total}] (0: the whole split)")
    return np.sort(np.random.default_rng(seed).choice(total, count, replace=False))


def check_model(name: str) -> None:
    if name not in resnet.PRESETS and name not in vit.PRESETS:
        raise DataError(f"unknown model {name!r} for the vision task; choose one of {MODELS}")


def make_model(name: str, num_classes: int) -> nn.Module:
    check_model(name)
    return (resnet.make if name in resnet.PRESETS else vit.make)(name, num_classes)


def forward_rank(path: str) -> tuple[int, ...]:
    """A layer's place in the forward pass, equal for the leaves of one layer (kernel and bias):
    the stem, then block i in order (``ResNetBlock_i``, ``encoderblock_i``) and its layers in
    order (``LayerNorm_0`` < ``MultiHeadDotProductAttention_1`` < ...; ``Conv_j`` < ``BatchNorm_j``
    < ``Conv_{j+1}``, the projection shortcut first), then the final norm and the head. For
    ``params.last_fraction``: "the last layers holding x% of the parameters"."""
    parts = path.split("/")[1:-1]  # without the collection and the leaf name
    for i, part in enumerate(parts):
        name, _, index = part.rpartition("_")
        if index.isdigit() and (name.endswith("Block") or name == "encoderblock"):
            return (1, int(index), *_layer_rank(parts[i + 1] if i + 1 < len(parts) else ""))
        if part in ("encoder_norm", "Dense_0", "head"):
            return 2, ("encoder_norm", "Dense_0", "head").index(part), 0
    return 0, 0, 0


def _layer_rank(layer: str) -> tuple[int, int]:
    name, _, index = layer.rpartition("_")
    if not index.isdigit():  # conv_proj / norm_proj: the shortcut branch
        return -1, ("conv_proj", "norm_proj").index(layer) if layer in (
            "conv_proj",
            "norm_proj",
        ) else 0
    return int(index), 1 if name == "BatchNorm" else 0


def get_task(config: ml_collections.ConfigDict, workdir: epath.Path) -> Task:
    """The task contract (``tasks/base.py``) for ``config.model`` on ``config.data``."""
    del workdir
    d = config.data
    check_model(config.model)  # an unknown model fails before any data is opened
    train_base, num_classes = open_split(d.source, d.dir, d.train_split, d.image_size)
    eval_base, _ = open_split(d.source, d.dir, d.eval_split, d.image_size)
    model = make_model(config.model, num_classes)
    if isinstance(model, vit.ViT) and d.image_size % model.patch_size:
        raise DataError(
            f"model {config.model} cuts images into {model.patch_size}-pixel patches; "
            f"data.image_size={d.image_size} must be a multiple of {model.patch_size}"
        )
    train_rows = subset(train_base, d.num_train, config.seed, "num_train")
    eval_rows = subset(eval_base, d.num_eval, config.seed + 2, "num_eval")
    train, evaluation = mnist.noisy_label_splits(
        train_base, train_rows, eval_base, eval_rows, d.flip_fraction, config.seed + 1, num_classes
    )
    classifier = Classifier(model, (d.image_size, d.image_size, _channels(train_base)))
    return Task(
        name=f"vision/{config.model}",
        init_params=classifier.init_params,
        per_example_loss=classifier.per_example_loss,
        splits={"train": train, "eval": evaluation},
        input_columns=("image", "label"),
        record_columns=("label",),
        corruption_column="flipped",
        ground_truth_columns=("clean_label", "label"),
        metrics=classifier.accuracy,
        state=classifier.state,
        train_loss=classifier.train_loss if classifier.has_state else None,
        augment=augment if d.augment else None,
        param_rank=forward_rank,
    )


@dataclasses.dataclass(frozen=True)
class Classifier:
    """Softmax cross-entropy over a Flax image model; the variables dict is the task's params
    (``{'params': ...}``, plus ``'batch_stats'`` for a model with BatchNorm)."""

    model: nn.Module
    input_shape: tuple[int, ...]

    @property
    def has_state(self) -> bool:
        return isinstance(self.model, resnet.ResNet)

    @property
    def state(self) -> str:
        """The ``Task.state`` pattern of this model: its BatchNorm statistics, or none."""
        return STATE if self.has_state else ""

    def init_params(self, key: jax.Array) -> dict[str, Any]:
        dummy = jnp.zeros((1, *self.input_shape), jnp.float32)
        return dict(self.model.init(key, dummy, train=False))

    def per_example_loss(self, variables: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Inference mode (BatchNorm by its running statistics): example i's loss depends on
        example i only, the loss whose Hessian influence inverts."""
        logits = self.model.apply(variables, batch["image"], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])

    def train_loss(self, variables: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Any]:
        """Training mode: BatchNorm by the batch moments, and the updated running statistics."""
        logits, updated = self.model.apply(
            variables, batch["image"], train=True, mutable=["batch_stats"]
        )
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return losses, {"batch_stats": updated["batch_stats"]}

    def accuracy(self, variables: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        logits = self.model.apply(variables, batch["image"], train=False)
        return {"accuracy": (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)}


def _channels(source: Source) -> int:
    image = source.take(np.arange(1))["image"]
    if image.ndim != 4:
        raise DataError(
            f"images have shape {image.shape[1:]}; the task needs (height, width, channels)"
        )
    return int(image.shape[-1])
