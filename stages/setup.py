"""What every stage sets up before its work: mesh → checks → task → parameter selection and
shardings.

Each job's ``run(config, workdir)`` starts with ``Stage.setup``; the order matters: the mesh
must exist before the checks (batch sizes must divide its 'data' axis), and the checks run before
the task is built, so bad input costs nothing; checks that need the split sizes run right after
(sources are lazy: nothing but the sizes and one example is read). Restoring saved results (``stages/artifacts.py``)
comes next and takes the Stage.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh

from influence.selection import Selection, SelectionError
from methods import registry
from methods.base import Method
from parallel import sharding
from parallel.mesh import make_mesh
from runtime import finite
from runtime.errors import InputError
from stages import checks
from stages import workdir as wd
from tasks import loading
from tasks.base import Task
from tasks.sources import Source

Check = Callable[[ml_collections.ConfigDict, Mesh], None]


def check_all(config: ml_collections.ConfigDict, checks: Sequence[Check]) -> None:
    """Every stage's input checks at once, before the first stage of a job that runs several
    (jobs.pipeline): a bad score field stops the job before training, not after it."""
    finite.check_config(config)
    m = config.mesh
    mesh = make_mesh(m.data, m.model, m.num_devices, m.num_slices)
    for check in checks:
        check(config, mesh)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage's view of the run: its config, workdir, mesh, task and data, and the layout of
    the task's parameters on the mesh.

    Attributes:
      params_like: ShapeDtypeStructs of the task's params (no array is allocated).
      param_sh: a NamedSharding per param leaf (``parallel/sharding.py`` rules).
      selection: the leaves influence covers (``config.params``, else the task's default).
      vectors_like, vector_sh: the selected leaves of ``params_like`` and ``param_sh``: the
        shape and layout of every Krylov vector and eigenvector.
    """

    config: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: Mesh
    task: Task
    params_like: Any
    param_sh: Any
    selection: Selection
    method: Method

    @classmethod
    def setup(
        cls, config: ml_collections.ConfigDict, workdir: epath.PathLike, check: Check
    ) -> "Stage":
        finite.check_config(config)
        m = config.mesh
        mesh = make_mesh(m.data, m.model, m.num_devices, m.num_slices)
        check(config, mesh)
        task = loading.load(config, workdir)
        checks.check_sizes(config, task)
        params_like = jax.eval_shape(task.init_params, jax.random.key(0))
        param_sh = sharding.param_shardings(params_like, mesh, m.min_shard_size)
        try:
            selection = Selection.build(
                params_like,
                config.params.include or task.param_include,
                config.params.exclude or task.param_exclude,
                state=task.state,
                last_fraction=config.params.last_fraction,
                rank=task.param_rank,
            )
        except SelectionError as e:
            raise InputError(str(e)) from e
        method = registry.of(config)
        if method.check_size is not None:  # before any params are restored or fitted
            method.check_size(config, selection.select(params_like))
        return cls(
            config, epath.Path(workdir), mesh, task, params_like, param_sh, selection, method
        )

    @property
    def vectors_like(self) -> Any:
        return self.selection.select(self.params_like)

    @property
    def vector_sh(self) -> Any:
        return self.selection.select(self.param_sh)

    @property
    def train_fingerprint(self) -> dict[str, Any]:
        """What the trained params depend on (``stages/workdir.py``)."""
        return wd.train_fingerprint(self.config, dict(self.task.fingerprint))

    def split(self, name: str) -> Source:
        return self.task.splits[name]

    def path(self, name: str) -> epath.Path:
        """A result's location inside the workdir (names in ``stages/workdir.py``; a method's
        own results under ``methods/<name>/`` unless it is Arnoldi)."""
        return self.workdir / wd.result(self.config, name)
