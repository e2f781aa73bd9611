"""What every stage sets up before its work: mesh → checks → task → parameter selection and
shardings, as the ``Context`` methods and the scoring machinery take (``methods/base.py``).

Each stage's ``run(config, workdir)`` starts with ``context``; the order matters: the mesh must
exist before the checks (batch sizes must divide its 'data' axis), and the checks run before the
task is built, so bad input costs nothing; checks that need the split sizes run right after
(sources are lazy: nothing but the sizes and one example is read). Restoring saved results
(``stages/artifacts.py``) comes next and takes the context.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh

from checkpoints import fingerprint
from influence.selection import Selection
from methods import registry
from methods.base import Context
from parallel import sharding
from parallel.mesh import make_mesh
from runtime import finite, workdir
from stages import blocks, checks
from tasks import loading

Check = Callable[[ml_collections.ConfigDict, Mesh], None]


def _mesh(config: ml_collections.ConfigDict) -> Mesh:
    finite.check_config(config)
    m = config.mesh
    return make_mesh(m.data, m.model, m.num_devices, m.num_slices)


def check_all(config: ml_collections.ConfigDict, stage_checks: Sequence[Check]) -> None:
    """Every stage's input checks at once, before the first stage of a job that runs several
    (jobs.pipeline): a bad score field stops the job before training, not after it."""
    mesh = _mesh(config)
    for check in stage_checks:
        check(config, mesh)


def context(
    config: ml_collections.ConfigDict,
    directory: epath.PathLike,
    check: Check,
    size_check: bool = True,
) -> Context:
    """The stage's ``Context`` after its checks (module docstring): a workdir of another layout is
    refused before anything reads or writes it, and marked with this layout once every check
    passed (``runtime/workdir.py``). ``size_check=False`` leaves out the configured method's
    checks of the model's size (the report checks each of its methods itself)."""
    mesh = _mesh(config)
    check(config, mesh)
    workdir.check(directory)
    task = loading.load(config, directory)
    checks.check_sizes(config, task)
    params_like = jax.eval_shape(task.init_params, jax.random.key(0))
    param_sh = sharding.param_shardings(params_like, mesh, config.mesh.min_shard_size)
    selection = Selection.build(
        params_like,
        config.params.include or task.param_include,
        config.params.exclude or task.param_exclude,
        state=task.state,
        last_fraction=config.params.last_fraction,
        rank=task.param_rank,
    )
    method = registry.of(config)
    if size_check and method.check_size is not None:  # before params are restored or fitted
        method.check_size(config, selection.select(params_like))
    workdir.mark(directory)
    return Context(
        config, epath.Path(directory), mesh, task, params_like, param_sh, selection, method
    )


def train_fingerprint(ctx: Context) -> dict[str, Any]:
    """What the trained params depend on: every config field but the blocks that declare they do
    not change training (``stages/blocks.py`` and the methods'), and the task's own additions."""
    return fingerprint.training(ctx.config, blocks.all_blocks(ctx.config), ctx.task.fingerprint)
