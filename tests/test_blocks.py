"""Config blocks and the one fingerprint module: each module declares the fields it reads and
whether they change training (runtime/config.py, stages/blocks.py, each method's ``config``), the
base config assembles them, and the trained params' fingerprint counts exactly the training ones;
a workdir of the first layout is refused in one line (runtime/workdir.py)."""

import json
from pathlib import Path

import pytest

from checkpoints import fingerprint
from configs import common
from methods import registry
from runtime import config as config_lib
from runtime import workdir
from runtime.config import Block
from runtime.errors import InputError
from stages import blocks
from tests.pipeline_helpers import run_job, tiny_config


def test_a_field_declared_twice_with_other_defaults_is_a_bug() -> None:
    same = [Block("method", {"damping": 1e-3}), Block("method", {"damping": 1e-3, "tol": 1e-4})]
    assert config_lib.assemble(same).method.to_dict() == {"damping": 1e-3, "tol": 1e-4}
    with pytest.raises(ValueError, match=r"method\.damping declared with defaults 0\.001 and 1"):
        config_lib.assemble([*same, Block("method", {"damping": 1.0})])
    with pytest.raises(ValueError, match="declared both training and not"):
        config_lib.assemble([Block("train", {"a": 1}, trains=True), Block("train", {"b": 2})])


def test_every_method_declares_the_fields_it_fingerprints() -> None:
    """A method's fingerprint names fields of the assembled base config, each declared by the
    method itself or by a stage."""
    config = common.base_config()
    for name in registry.BUILTIN:
        method = registry.get(name)
        declared = {b.dotted(f) for b in (*method.config, *blocks.STAGES) for f in b.defaults}
        for field in method.fingerprint:
            assert field in declared, (name, field)
            config_lib.value(config, field)


def test_the_training_fingerprint_counts_only_training_fields() -> None:
    """Stage and method blocks that do not change training stay out of it; training fields, the
    task's own blocks and its additions are in it."""
    config = tiny_config()
    config.my_task = {"width": 3}  # a block a task of one's own reads
    found = fingerprint.training(config, blocks.all_blocks(config), {"tokenizer": "abc"})
    assert {"seed", "l2", "data.num_train", "train.learning_rate", "my_task.width"} <= set(found)
    assert found["task.tokenizer"] == "abc"
    for left_out in ("arnoldi.num_iters", "method.damping", "distill.top_k", "score.batch_size"):
        assert left_out not in found
    assert not {"train.checkpoint_every", "train.keep_epochs", "log_every_secs"} & set(found)
    assert not any(k.split(".")[0] in ("mesh", "params", "filter", "report") for k in found)
    # Changing a method's field leaves the params' id as it was; a training field changes it.
    other = tiny_config(method__damping=5.0, arnoldi__num_iters=3)
    assert fingerprint.digest(fingerprint.training(other, blocks.all_blocks(other))) == (
        fingerprint.digest(fingerprint.training(tiny_config(), blocks.all_blocks()))
    )
    changed = tiny_config(train__learning_rate=0.5)
    assert fingerprint.training(changed, blocks.all_blocks())["train.learning_rate"] == 0.5


def test_first_layout_workdir_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    """A workdir with Arnoldi's results at its top (layout 1): one line naming what was found,
    exit 2, nothing written into it; a workdir holding only copied params is taken."""
    old = tmp_path / "old"
    (old / "params").mkdir(parents=True)
    (old / "krylov").mkdir()
    (old / "eigenvalues.json").write_text("{}")
    before = sorted(p.name for p in old.rglob("*"))
    done = run_job("pipeline", old)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --workdir=") and "earlier version" in last, last
    assert "krylov, eigenvalues.json" in last and "use a new --workdir" in last, last
    assert sorted(p.name for p in old.rglob("*")) == before
    copied = tmp_path / "copied"
    (copied / "params").mkdir(parents=True)
    workdir.claim(copied)
    assert json.loads((copied / workdir.LAYOUT_JSON).read_text()) == {"layout": workdir.LAYOUT}
    (copied / workdir.LAYOUT_JSON).write_text(json.dumps({"layout": 99}))
    with pytest.raises(InputError, match="has layout 99, this version reads layout 2"):
        workdir.claim(copied)
