"""Finding a task: ``config.task`` is an import path, the built-in short names are aliases.

A user's task lives in their own package (``my_package.my_task``) and needs no change here: the
module must provide ``get_task(config, workdir) -> tasks.base.Task`` (see ``tasks/base.py``).
"""

import importlib
from types import ModuleType

from tasks.sources import DataError

ALIASES = {
    "mnist": "tasks.mnist",
    "translation": "tasks.translation",
    "vision": "tasks.vision",
    "lora_text": "tasks.lora_text",
    "lm": "tasks.lm",
}


def task_module(name: str) -> ModuleType:
    """The module ``name`` (or its alias) after checking it provides ``get_task``; a missing module
    or entry point is a one-line ``DataError``. An import error raised *inside* the task module
    (a bug, a missing dependency of its own) propagates as is."""
    path = ALIASES.get(name, name)
    if not path:
        raise DataError(f"config.task is empty; give a task module such as {sorted(ALIASES)}")
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as e:
        if e.name is None or not (path == e.name or path.startswith(e.name + ".")):
            raise
        raise DataError(
            f"config.task={name!r}: no module {path!r} can be imported (built-in tasks: "
            f"{sorted(ALIASES)}; a task of your own must be importable, e.g. on PYTHONPATH)"
        ) from e
    if not callable(getattr(module, "get_task", None)):
        raise DataError(
            f"config.task={name!r}: module {path!r} has no get_task(config, workdir) function "
            "returning a tasks.base.Task (see tasks/base.py)"
        )
    return module
