"""Every preset of every config in configs/ is valid for the data it names, and preset values
parse strictly."""

import importlib

import pytest

from checkpoints.fingerprint import digest
from methods import arnoldi as arnoldi_method
from parallel.mesh import make_mesh
from stages import checks
from tasks import loading
from tests import vision_data
from tests.pipeline_helpers import REPO, fit_summary, run_job

CONFIG_MODULES = sorted(
    p.stem for p in (REPO / "configs").glob("*.py") if p.stem not in ("__init__", "common")
)


def preset_variants(module_name: str) -> list[tuple[str, str]]:
    """(module, preset string): the default, each boolean preset switched on, each choice of a
    choice preset, and each boolean with each choice (``pod,model=small_cnn``)."""
    module = importlib.import_module(f"configs.{module_name}")
    switches = [k for k, v in module.PRESETS.items() if isinstance(v, bool)]
    choices = [f"{k}={c}" for k, options in getattr(module, "CHOICES", {}).items() for c in options]
    variants = ["", *switches, *choices, *(f"{s},{c}" for s in switches for c in choices)]
    return [(module_name, v) for v in variants]


@pytest.fixture(scope="module")
def task_workdirs(tmp_path_factory: pytest.TempPathFactory):
    """One workdir per data block: what a task derives from its data (a tokenizer) is made once
    for all the presets that share it."""
    root = tmp_path_factory.mktemp("tasks")
    return lambda config: root / digest(config.data.to_dict())


@pytest.fixture(scope="module")
def vision_data_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Stand-ins for the data configs/vision.py names outside the repository, in the same formats
    and at the sizes its presets read: Fashion-MNIST IDX files (60k/10k on a real machine, the
    4,000/1,000 the presets draw here) and an ImageNet-format TFDS dataset whose training split
    holds one full-batch HVP of the pod preset (b = 4,096)."""
    root = tmp_path_factory.mktemp("vision_data")
    fashion = vision_data.fashion_mnist_dir(root / "fashion", 4000, 1000)
    imagenet = vision_data.imagenet_like(root / "tfds", {"train": 4096, "validation": 8})
    return {"fashion_mnist": str(fashion), "imagenet": imagenet}


def redirect_data(config, dirs: dict[str, str]) -> None:
    """Point a vision preset at the test's stand-in of the data it names."""
    if config.data.source == "fashion_mnist":
        config.data.dir = dirs["fashion_mnist"]
    else:
        assert config.data.source == "tfds:imagenet2012", config.data.source
        config.data.source = f"tfds:{dirs['imagenet']}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module_name", "preset"),
    [pair for name in CONFIG_MODULES for pair in preset_variants(name)],
    ids=lambda x: x or "default",
)
def test_preset_is_valid_for_its_data(
    module_name: str, preset: str, task_workdirs, request: pytest.FixtureRequest
) -> None:
    """The checks every stage runs before its work pass on the mesh the preset asks for (over
    this test's 8 fake devices), and the data it names exists with enough examples (for
    configs/vision.py: stand-ins of its data in the same formats, ``vision_data_dirs``)."""
    config = importlib.import_module(f"configs.{module_name}").get_config(preset)
    if module_name == "vision":
        redirect_data(config, request.getfixturevalue("vision_data_dirs"))
    m = config.mesh
    mesh = make_mesh(m.data, m.model, m.num_devices, m.num_slices)
    for check in (checks.check_train, arnoldi_method.check, checks.check_score):
        check(config, mesh)
    task = loading.load(config, task_workdirs(config))
    checks.check_sizes(config, task)
    want = config.data.num_train or task.splits["train"].num_examples  # 0: the whole split
    assert task.splits["train"].num_examples == want >= config.arnoldi.hvp_batch_size


@pytest.mark.parametrize(
    ("preset", "message"),
    [
        ("runlocal=flase", "runlocal='flase' is not a boolean"),
        ("model=resnet", "model='resnet' is not one of"),
        ("top_k=abc", "top_k='abc' is not a valid int"),
        ("top_k=", "top_k='' is not a valid int"),
        ("runlocl", "unknown config preset 'runlocl'"),
        ("runlocal,runlocal", "given twice"),
    ],
)
def test_bad_preset_values_are_refused(preset: str, message: str) -> None:
    from configs import mnist

    with pytest.raises(ValueError, match=message):
        mnist.get_config(preset)


def test_boolean_presets_accept_the_usual_spellings() -> None:
    from configs import mnist

    for on in ("runlocal", "runlocal=true", "runlocal=1", "runlocal=Yes"):
        assert mnist.get_config(on).data.num_train == 256, on
    for off in ("runlocal=false", "runlocal=0", "runlocal=no"):
        assert mnist.get_config(off).data.num_train == 4000, off
    assert mnist.get_config("pod").model == "flax_cnn"
    assert mnist.get_config("pod,model=small_cnn").model == "small_cnn"
    hard = mnist.get_config("hard")
    assert (hard.model, hard.l2, hard.train.num_epochs) == ("flax_cnn", 0.0, 40)
    assert mnist.get_config("hard,model=small_cnn").model == "small_cnn"


@pytest.mark.slow
def test_pod_preset_runs_the_jobs(tmp_path) -> None:
    """``jobs.train`` then ``jobs.arnoldi --config=configs/mnist.py:pod`` on 8 fake devices: the
    Flax CNN with its large leaves, Krylov basis and eigenvectors split over a 'model' axis of 8,
    full-batch HVPs. Sized down by flags (1 epoch, 512 examples, n = 3) to stay seconds long."""
    flags = (
        "--num_cpu_devices=8",
        "--config.data.num_train=512",
        "--config.arnoldi.hvp_batch_size=512",
        "--config.train.num_epochs=1",
        "--config.arnoldi.num_iters=3",
        "--config.distill.top_k=2",
    )
    for job in ("train", "arnoldi"):
        result = run_job(job, tmp_path, *flags, config="configs/mnist.py:pod")
        assert result.returncode == 0, result.stderr[-3000:]
    assert "mesh {'data': 1, 'model': 8}" in result.stderr
    assert len(fit_summary(tmp_path)["eigvals"]) == 2
