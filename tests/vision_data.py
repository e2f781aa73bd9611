"""Tiny image datasets in the formats the vision task reads, built by the tests themselves:
Fashion-MNIST IDX files and an ImageNet-format TFDS ArrayRecord dataset of JPEG images."""

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """``array`` (uint8) as an IDX file: magic 0x0000 0x08 ndim, big-endian uint32 dims, bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + np.ascontiguousarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def class_images(labels: np.ndarray, size: int, channels: int, seed: int) -> np.ndarray:
    """uint8 images a small model learns in a few steps: class c lights a bar at row band c."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (labels.size, size, size, channels), dtype=np.uint8)
    band = max(1, size // 10)
    for i, c in enumerate(labels):
        images[i, c * band : (c + 1) * band] = 230
    return images


def fashion_mnist_dir(root: Path, num_train: int = 600, num_test: int = 200) -> Path:
    """A directory with the four Fashion-MNIST IDX files (gzipped, as Debian ships them)."""
    root.mkdir(parents=True, exist_ok=True)
    for stem, count, seed in (("train", num_train, 0), ("t10k", num_test, 1)):
        labels = np.random.default_rng(seed + 10).integers(0, 10, count).astype(np.uint8)
        images = class_images(labels, 28, 1, seed)[..., 0]
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labels)
    return root


def imagenet_like(
    data_dir: Path,
    sizes: dict[str, int],
    num_classes: int = 5,
    features: str = "imagenet",
    name: str = "imagenet2012",
) -> str:
    """A TFDS ArrayRecord dataset with the features of ``imagenet2012`` (JPEG ``image`` of any
    size, ``label`` ClassLabel, ``file_name``), images of varied shapes; its builder directory.

    ``features='no_label'`` drops the label, ``'flat'`` stores the image as a rank-2 tensor:
    datasets the vision task must refuse."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    spec = {
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=num_classes),
        "file_name": tfds.features.Text(),
    }
    if features == "no_label":
        del spec["label"]
    if features == "flat":
        spec["image"] = tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib")

    def split(count: int, seed: int) -> "tf.data.Dataset":
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, num_classes, count)
        shapes = rng.integers(24, 48, (count, 2))
        images = [class_images(labels[i : i + 1], 48, 3, seed + i)[0] for i in range(count)]
        images = [im[:h, :w] for im, (h, w) in zip(images, shapes, strict=True)]

        def gen():
            for i in range(count):
                example = {"image": images[i], "label": labels[i], "file_name": f"n{seed}_{i}.JPEG"}
                if features == "no_label":
                    del example["label"]
                if features == "flat":
                    example["image"] = example["image"][..., 0]
                yield example

        signature = {
            "image": tf.TensorSpec(
                (None, None) if features == "flat" else (None, None, 3), tf.uint8
            ),
            "label": tf.TensorSpec((), tf.int64),
            "file_name": tf.TensorSpec((), tf.string),
        }
        if features == "no_label":
            del signature["label"]
        return tf.data.Dataset.from_generator(gen, output_signature=signature)

    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name=name,
        version="5.1.0",
        features=tfds.features.FeaturesDict(spec),
        split_datasets={s: split(n, i * 1000) for i, (s, n) in enumerate(sizes.items())},
        data_dir=str(data_dir),
        file_format="array_record",
        disable_shuffling=True,
    )
    return str(builder.data_dir)
