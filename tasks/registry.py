"""Task lookup by name: config.task selects a module implementing ``make_task`` and ``load_splits``."""

import importlib
from types import ModuleType

from tasks.sources import DataError

TASKS = {"mnist": "tasks.mnist"}


def task_module(name: str) -> ModuleType:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return importlib.import_module(TASKS[name])
