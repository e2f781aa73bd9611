"""The vision workload (tasks/vision.py, tasks/resnet.py, tasks/vit.py): model sizes, HVPs against
jax.hessian with BatchNorm statistics held fixed, data in the Fashion-MNIST IDX and ImageNet TFDS
formats, state untouched by the optimizer and by Arnoldi, last-block parameter subsets, mesh
invariance, and bad input as one line."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from jax.flatten_util import ravel_pytree

from configs import vision as vision_config
from influence.hvp import make_hvp
from influence.selection import Selection, SelectionError
from methods import arnoldi as arnoldi_method
from runtime import failpoints
from stages import artifacts, fit, train
from stages.setup import context
from tasks import resnet, vision, vit
from tasks.base import Task
from tasks.sources import DataError, read_all
from tests import vision_data
from tests.pipeline_helpers import eigvals, fit_summary, results, run_job, steps

# End-to-end runs of the jobs: the full suite only (launch/test.sh --fast skips them).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(vision_data.fashion_mnist_dir(tmp_path_factory.mktemp("fashion")))


CONFIG = "configs/vision.py:runlocal"
# The runlocal preset sized down (in-process and as job flags: one source for both).
TINY = {
    "data.num_train": 128,
    "data.num_eval": 32,
    "train.num_epochs": 2,
    "train.batch_size": 32,
    "arnoldi.num_iters": 6,
    "arnoldi.hvp_batch_size": 64,
    "arnoldi.checkpoint_every": 3,
    "distill.top_k": 3,
    "log_every_secs": 1000.0,
}


def tiny_config(fashion_dir: str, model: str = "resnet_tiny", **data: object):
    config = vision_config.get_config(f"runlocal,model={model}")
    for dotted, value in TINY.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    config.data.dir = fashion_dir
    config.data.update(data)
    config.mesh.num_devices = 1
    return config


def tiny_flags(fashion_dir: str, model: str = "resnet_tiny") -> list[str]:
    return [
        f"--config.model={model}",
        f"--config.data.dir={fashion_dir}",
        *(f"--config.{k}={v}" for k, v in TINY.items()),
    ]


@pytest.mark.parametrize(
    ("make", "name", "num_params", "num_stats"),
    [
        (resnet.make, "resnet50", 25_557_032, 53_120),
        (resnet.make, "resnet18", 11_689_512, 9_600),
        (vit.make, "vit_b32", 88_224_232, 0),
        (vit.make, "vit_l32", 306_535_400, 0),
    ],
)
def test_model_presets_have_the_published_sizes(make, name, num_params, num_stats) -> None:
    """At 1,000 classes and 224 pixels: torchvision's ResNet50/18 and timm's ViT-B/32, ViT-L/32."""
    model = make(name, 1000)
    shapes = jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((1, 224, 224, 3)), train=False), jax.random.key(0)
    )
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    assert count(shapes["params"]) == num_params
    assert count(shapes.get("batch_stats", {})) == num_stats


def _perturbed(variables, key):
    """Random params and BatchNorm statistics far from their initial 0/1 (a zero head or an
    identity BatchNorm would hide a wrong HVP)."""
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(key, len(leaves))
    new = []
    for path, leaf, k in zip(
        jax.tree_util.tree_flatten_with_path(variables)[0], leaves, keys, strict=True
    ):
        noise = jax.random.normal(k, leaf.shape) * 0.3
        if "var" in str(path[0]):
            new.append(jnp.exp(noise))
        else:
            new.append(leaf + noise)
    return jax.tree.unflatten(treedef, new)


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
    ],
    ids=["resnet", "vit"],
)
def test_hvp_is_the_hessian_of_params_with_statistics_fixed(model) -> None:
    """The pipeline's HVP (selection over everything but the state) equals jax.hessian · v of the
    inference-mode loss in ``params`` alone (rtol 1e-4); the statistics are not in the vectors."""
    classifier = vision.Classifier(model, (8, 8, 1))
    variables = _perturbed(classifier.init_params(jax.random.key(0)), jax.random.key(1))
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.normal(size=(6, 8, 8, 1)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 3, 6)),
    }
    selection = Selection.build(variables, ".*", state=classifier.state)
    assert all(p.startswith("params/") for p in selection.selected)
    v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape), variables["params"])
    hvp = jax.jit(make_hvp(classifier.per_example_loss, 1e-3, selection))
    assert jax.tree.structure(selection.select(variables)) == jax.tree.structure({"params": v})
    got = hvp(variables, batch, {"params": v})

    flat, unravel = ravel_pytree(variables["params"])

    def reference_loss(p):  # written from the model alone: BatchNorm by the running statistics
        logits = model.apply({**variables, "params": unravel(p)}, batch["image"], train=False)
        labels = jax.nn.one_hot(batch["label"], 3)
        cross_entropy = -(labels * jax.nn.log_softmax(logits)).sum(-1).mean()
        return cross_entropy + 0.5e-3 * jnp.vdot(p, p)

    hessian = jax.jit(jax.hessian(reference_loss))(flat)
    want = hessian @ ravel_pytree(v)[0]
    np.testing.assert_allclose(
        ravel_pytree(got)[0], want, rtol=1e-4, atol=1e-6 * np.abs(want).max()
    )


def test_fashion_mnist_idx_files(tmp_path, fashion_dir: str) -> None:
    """IDX files gzipped or raw read back exactly; a missing file or a foreign file is one line."""
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for compress in (True, False):
        vision_data.write_idx(tmp_path / "a.idx", array, compress)
        np.testing.assert_array_equal(vision.read_idx(epath.Path(tmp_path / "a.idx")), array)
    source = vision.fashion_mnist(fashion_dir, "test")
    columns = read_all(source)
    assert columns["image"].shape == (200, 28, 28, 1) and columns["label"].shape == (200,)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        vision.fashion_mnist(str(tmp_path), "train")
    (tmp_path / "bad").mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (tmp_path / "bad" / name).write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="not an IDX file"):
        vision.fashion_mnist(str(tmp_path / "bad"), "train")


def test_splits_flip_labels_and_keep_ids(fashion_dir: str) -> None:
    config = tiny_config(fashion_dir, flip_fraction=0.25)
    task = vision.get_task(config, epath.Path("/nonexistent"))
    train_split = read_all(task.splits["train"])
    assert (
        train_split["image"].shape == (128, 28, 28, 1) and train_split["image"].dtype == np.float32
    )
    assert train_split["image"].min() >= -1.0 and train_split["image"].max() <= 1.0
    assert train_split["flipped"].sum() == 32
    flipped = train_split["flipped"]
    assert (train_split["label"][flipped] != train_split["clean_label"][flipped]).all()
    assert (train_split["label"][~flipped] == train_split["clean_label"][~flipped]).all()
    raw = read_all(vision.fashion_mnist(fashion_dir, "train"))  # ids are rows of the split
    np.testing.assert_array_equal(raw["label"][train_split["id"]], train_split["clean_label"])
    again = read_all(vision.get_task(config, epath.Path("/x")).splits["train"])
    np.testing.assert_array_equal(again["id"], train_split["id"])


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("imagenet")
    return vision_data.imagenet_like(root, {"train": 48, "validation": 16})


def test_imagenet_format_jpeg_records(imagenet_dir: str) -> None:
    """JPEG images of varied sizes, decoded record by record, resized (shorter side to 8/7 of the
    size) and centre-cropped to one size; ids are rows of each split; the labels are kept."""
    import tensorflow_datasets as tfds

    records = tfds.builder_from_directory(imagenet_dir).as_data_source("train")
    config = tiny_config("", source=f"tfds:{imagenet_dir}", image_size=16, eval_split="validation")
    config.data.num_train, config.data.num_eval, config.data.flip_fraction = 0, 0, 0.0
    task = vision.get_task(config, epath.Path("/x"))
    assert task.splits["train"].num_examples == 48 and task.splits["eval"].num_examples == 16
    columns = task.splits["train"].take(np.array([5, 2]))
    assert columns["image"].shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(columns["id"], [5, 2])
    np.testing.assert_array_equal(columns["label"], [records[5]["label"], records[2]["label"]])
    from PIL import Image

    raw = records[5]["image"]
    h, w, _ = raw.shape
    scale = 18 / min(h, w)  # round(16 · 8/7) = 18
    nh, nw = max(16, round(h * scale)), max(16, round(w * scale))
    resized = np.asarray(Image.fromarray(raw).resize((nw, nh), Image.BILINEAR))
    top, left = (nh - 16) // 2, (nw - 16) // 2
    want = resized[top : top + 16, left : left + 16].astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(columns["image"][0], want)


@pytest.mark.parametrize(
    ("features", "message"),
    [("no_label", "needs 'image' and 'label'"), ("flat", "needs an Image of shape")],
)
def test_datasets_that_do_not_fit_are_one_line(tmp_path, features: str, message: str) -> None:
    builder_dir = vision_data.imagenet_like(tmp_path, {"train": 4}, features=features)
    config = tiny_config("", source=f"tfds:{builder_dir}", eval_split="train")
    with pytest.raises(DataError, match=message):
        vision.get_task(config, epath.Path("/x"))


def test_bad_model_and_missing_data_stop_the_job_in_one_line(tmp_path) -> None:
    """Through the job binary: exit 2, one ``error:`` line, nothing written to the workdir."""
    cases = [
        (("--config.model=resnet51",), "unknown model 'resnet51' for the vision task"),
        (("--config.data.dir=" + str(tmp_path / "none"),), "apt-get install dataset-fashion-mnist"),
    ]
    for flags, message in cases:
        workdir = tmp_path / "work"
        result = run_job("train", workdir, *flags, config=CONFIG)
        assert result.returncode == 2, result.stderr[-2000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
        assert not workdir.exists() or not any(workdir.iterdir())
    with pytest.raises(ValueError, match="model='resnet51' is not one of"):
        vision_config.get_config("model=resnet51")


def test_augmentation_is_seeded_per_example() -> None:
    rng = np.random.default_rng(0)
    columns = {"image": rng.normal(size=(4, 16, 16, 1)).astype(np.float32), "label": np.arange(4)}
    seeds = np.array([1, 2, 3, 4], np.uint64)
    first = vision.augment(columns, seeds)["image"]
    np.testing.assert_array_equal(first, vision.augment(columns, seeds)["image"])
    np.testing.assert_array_equal(
        first[2], vision.augment({"image": columns["image"][2:3]}, seeds[2:3])["image"][0]
    )
    assert not np.array_equal(first, columns["image"])


def _minimal_suffix(shapes, selection, fraction: float) -> None:
    """The selection is the last layers in forward order, holds ≥ ``fraction`` of the
    candidates, and without its first layer would hold less."""
    sizes = dict(zip(selection.paths, (x.size for x in jax.tree.leaves(shapes)), strict=True))
    candidates = [p for p in selection.paths if not p.startswith("batch_stats/")]
    ranks = {p: vision.forward_rank(p) for p in candidates}
    first = min(ranks[p] for p in selection.selected)
    assert set(selection.selected) == {p for p in candidates if ranks[p] >= first}
    total = sum(sizes[p] for p in candidates)
    held = sum(sizes[p] for p in selection.selected)
    assert held >= fraction * total > held - sum(sizes[p] for p in candidates if ranks[p] == first)


def test_last_fraction_keeps_the_last_layers() -> None:
    """``params.last_fraction``: the head, the final norm and the last layers, whole, holding
    ≥ 20% of the parameters and no layer more than needed; never the statistics."""
    model = vit.ViT(num_classes=10, patch_size=4, width=16, depth=4, mlp_dim=32, num_heads=2)
    shapes = jax.eval_shape(vision.Classifier(model, (28, 28, 1)).init_params, jax.random.key(0))
    s = Selection.build(shapes, last_fraction=0.2, rank=vision.forward_rank)
    assert {p.split("/")[2] for p in s.selected if "encoderblock" in p} == {"encoderblock_3"}
    assert {"params/head/kernel", "params/Transformer/encoder_norm/scale"} <= set(s.selected)
    assert "params/Transformer/encoderblock_3/MlpBlock_3/Dense_1/kernel" in s.selected
    _minimal_suffix(shapes, s, 0.2)
    model = resnet.make("resnet50", 1000)
    shapes = jax.eval_shape(vision.Classifier(model, (224, 224, 3)).init_params, jax.random.key(0))
    for fraction in (0.1, 0.2):
        s = Selection.build(
            shapes, state=vision.STATE, last_fraction=fraction, rank=vision.forward_rank
        )
        assert {p.split("/")[1] for p in s.selected} == {"BottleneckResNetBlock_15", "Dense_0"}
        _minimal_suffix(shapes, s, fraction)
    with pytest.raises(SelectionError, match=r"Task\.param_rank"):
        Selection.build(shapes, last_fraction=0.2)


def test_trainable_leaves_alone_move() -> None:
    """``Task.trainable``: one train step changes the selected leaves and no other (a frozen
    body under a trainable head, as under adapters)."""
    import optax

    from parallel import programs, sharding
    from parallel.mesh import make_mesh

    model = vit.ViT(num_classes=3, patch_size=4, width=8, depth=1, mlp_dim=8, num_heads=2)
    classifier = vision.Classifier(model, (8, 8, 1))
    params = _perturbed(classifier.init_params(jax.random.key(0)), jax.random.key(1))
    task = Task(
        name="t",
        init_params=classifier.init_params,
        per_example_loss=classifier.per_example_loss,
        splits={},
        input_columns=("image", "label"),
        trainable=r"params/head/.*",
    )
    trainable, state = train.selections(task, params)
    assert trainable.selected == ("params/head/bias", "params/head/kernel") and state is None
    mesh = make_mesh(1, 1, 1, 1)
    optimizer = optax.adam(0.1)
    start = {"params": params, "opt_state": optimizer.init(trainable.select(params))}
    state_sh = sharding.param_shardings(start, mesh, 2**20)
    step = programs.jit_train_step(
        train.objective(task, 1e-3, trainable, None), optimizer, trainable, state_sh, mesh
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(4, 8, 8, 1)).astype(np.float32),
        "label": rng.integers(0, 3, 4).astype(np.int32),
    }
    after, _ = step(jax.tree.map(jnp.copy, start), batch)
    for path, before, now in zip(
        trainable.paths, jax.tree.leaves(params), jax.tree.leaves(after["params"]), strict=True
    ):
        moved = not np.array_equal(np.asarray(before), np.asarray(now))
        assert moved == path.startswith("params/head/"), path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, fashion_dir: str):
    """A workdir with a resnet_tiny trained 2 epochs (BatchNorm statistics updated)."""
    workdir = tmp_path_factory.mktemp("vision_trained")
    train.run(tiny_config(fashion_dir), workdir)
    return workdir


def _saved_params(config, workdir):
    ctx = context(config, workdir, arnoldi_method.check)
    params, ctx = artifacts.restore_params(ctx)
    return ctx, jax.device_get(params)


@pytest.fixture(scope="module")
def one_device(trained, fashion_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """``trained`` after an uninterrupted Arnoldi on 1 device, in this process."""
    workdir = tmp_path_factory.mktemp("vision_one") / "w"
    shutil.copytree(trained, workdir)
    fit.run(tiny_config(fashion_dir), workdir)
    return workdir


def test_training_updates_statistics_and_arnoldi_leaves_them(trained, one_device, fashion_dir):
    """The optimizer covers ``params`` only; training moved the statistics away from their
    initial 0/1 (the train loss updates them); after Arnoldi the saved variables are the same
    bits, and the Krylov vectors hold no statistic."""
    config = tiny_config(fashion_dir)
    ctx, params = _saved_params(config, trained)
    initial = ctx.task.init_params(jax.random.key(config.seed))
    moved = [
        np.abs(np.asarray(a) - np.asarray(b)).max()
        for a, b in zip(
            jax.tree.leaves(params["batch_stats"]),
            jax.tree.leaves(initial["batch_stats"]),
            strict=True,
        )
    ]
    assert min(moved) > 1e-4
    trainable, state = train.selections(ctx.task, ctx.params_like)
    assert all(p.startswith("params/") for p in trainable.selected)
    assert state is not None and all(p.startswith("batch_stats/") for p in state.selected)
    assert set(ctx.vectors_like) == {"params"}
    assert ctx.selection.describe(ctx.params_like) == (
        "1,382 of 1,382 parameters (20 of 20 leaves); 72 values of state held fixed (12 leaves)"
    )
    _, after = _saved_params(config, one_device)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    assert steps(results(one_device) / "krylov") == [3, 6]
    summary = fit_summary(one_device)
    assert 0.0 <= summary["negative_mass_fraction"] < 1.0


def test_arnoldi_resumes_after_sigkill_identically(trained, one_device, fashion_dir, tmp_path):
    """SIGKILL at iteration 6 of 6 (steps 2 and maybe 4 saved, every 2 here), then the same job
    again: the same eigenvalues, to the bit, as the uninterrupted run."""
    workdir = tmp_path / "killed"
    shutil.copytree(trained, workdir)
    flags = [*tiny_flags(fashion_dir), "--config.arnoldi.checkpoint_every=2"]
    killed = run_job(
        "arnoldi", workdir, *flags, config=CONFIG, env={failpoints.ENV: "arnoldi_iteration=6"}
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    saved = steps(results(workdir) / "krylov")
    assert saved and max(saved) < 6 and not (results(workdir) / "fit.json").exists(), saved
    resumed = run_job("arnoldi", workdir, *flags, config=CONFIG)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming Arnoldi at iteration {max(saved)}" in resumed.stderr
    np.testing.assert_array_equal(eigvals(workdir), eigvals(one_device))


@pytest.mark.parametrize("model", ["resnet_tiny", "vit_tiny"])
def test_eight_devices_match_one(model, trained, one_device, fashion_dir, tmp_path):
    """Arnoldi with params, Krylov basis and eigenvectors sharded over a 'model' axis of 8 fake
    devices gives the 1-device eigenvalues (rtol 1e-5). (The ViT trains with augmentation.)"""
    config = tiny_config(fashion_dir, model)
    if model == "resnet_tiny":
        reference = one_device
    else:
        reference = tmp_path / "one"
        config.train.num_epochs, config.data.augment = 1, True
        train.run(config, reference)
        fit.run(config, reference)
    config.mesh.num_devices, config.mesh.data, config.mesh.model = 8, 1, 8
    config.mesh.min_shard_size = 16
    workdir = tmp_path / "eight"
    shutil.copytree(reference / "params", workdir / "params")
    fit.run(config, workdir)
    ctx = context(config, workdir, arnoldi_method.check)
    specs = [str(sh.spec) for sh in jax.tree.leaves(ctx.vector_sh)]
    assert sum("model" in spec for spec in specs) >= 3, specs  # the test would be vacuous
    np.testing.assert_allclose(eigvals(workdir), eigvals(reference), rtol=1e-5)
