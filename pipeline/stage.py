"""What every stage sets up before its work: mesh → checks → data → parameter shardings.

Each job's ``run(config, workdir)`` starts with ``Stage.setup``; the order matters: the mesh
must exist before the checks (batch sizes must divide its 'data' axis), and the checks run before
any data is read, so bad input costs nothing. Restoring saved results (``pipeline/artifacts.py``)
comes next and takes the Stage.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from etils import epath
from jax.sharding import Mesh

from parallel import sharding
from parallel.mesh import make_mesh
from pipeline import data
from tasks.base import ClassificationTask
from tasks.sources import Source

Check = Callable[[ml_collections.ConfigDict, Mesh], None]


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage's view of the run: its config, workdir, mesh, task and data, and the layout of
    the task's parameters on the mesh.

    Attributes:
      params_like: ShapeDtypeStructs of the task's params (no array is allocated).
      param_sh: a NamedSharding per param leaf (``parallel/sharding.py`` rules); the Krylov basis
        and the eigenvectors follow it.
    """

    config: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: Mesh
    task_data: data.TaskData
    params_like: Any
    param_sh: Any

    @classmethod
    def setup(
        cls, config: ml_collections.ConfigDict, workdir: epath.PathLike, check: Check
    ) -> "Stage":
        m = config.mesh
        mesh = make_mesh(m.data, m.model, m.num_devices, m.num_slices)
        check(config, mesh)
        task_data = data.load(config)
        params_like = jax.eval_shape(task_data.task.init_params, jax.random.key(0))
        param_sh = sharding.param_shardings(params_like, mesh, m.min_shard_size)
        return cls(config, epath.Path(workdir), mesh, task_data, params_like, param_sh)

    @property
    def task(self) -> ClassificationTask:
        return self.task_data.task

    def split(self, name: str) -> Source:
        return self.task_data.splits[name]

    def path(self, name: str) -> epath.Path:
        """A result's location inside the workdir (names in ``pipeline/workdir.py``)."""
        return self.workdir / name
