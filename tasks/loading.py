"""Loading the configured task: ``config.task`` names its module (``tasks/registry.py``); the task
is checked against the contract (``tasks/base.py``) and its training split restricted by
``config.filter`` (``tasks/filtering.py``).
"""

import ml_collections
import numpy as np
from etils import epath

from tasks import filtering
from tasks.base import Task
from tasks.registry import task_module
from tasks.sources import DataError


def load(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> Task:
    """The task named by ``config.task`` (``tasks/base.py``), with both splits, its training split
    restricted by ``config.filter`` (``tasks/filtering.py``). A task reports bad settings or
    data as ``tasks.sources.DataError``; anything else it raises is a bug and propagates as is."""
    filtering.check_config(config)
    task = task_module(config.task).get_task(config, epath.Path(workdir))
    if not isinstance(task, Task):
        raise DataError(
            f"config.task={config.task!r}: get_task returned {type(task).__name__}, not a "
            "tasks.base.Task"
        )
    missing = {"train", "eval"} - set(task.splits)
    if missing:
        raise DataError(
            f"config.task={config.task!r}: get_task's splits lack {sorted(missing)} (it gave "
            f"{sorted(task.splits)}); give 'train' and 'eval' sources (eval may be empty)"
        )
    if task.state and task.train_loss is None:
        raise DataError(
            f"config.task={config.task!r}: the task marks state leaves ({task.state!r}) but gives "
            "no train_loss to update them; give Task.train_loss or drop Task.state"
        )
    train = task.splits["train"]
    if train.num_examples < 1:
        raise DataError(f"config.task={config.task!r}: the training split is empty")
    need = {"id", *task.output_columns(), *task.input_columns, *task.ground_truth_columns}
    absent = need - set(train.take(np.arange(1)))
    if absent:
        raise DataError(
            f"config.task={config.task!r}: training examples lack the columns {sorted(absent)} "
            "that the task names (input, record, corruption and ground-truth columns, and 'id')"
        )
    return filtering.apply(config, task)
