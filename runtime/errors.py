"""The errors that mean "the input is wrong" (``influence.errors.UserError``): every job prints
the message as one line and exits 2 (``jobs/cli.py``), the Python API raises it as it is.

Each layer raises its own kind: ``SelectionError`` (params.include/exclude), ``MeshError``,
``DistributedError``, ``MemoryBudgetError`` (parallel/), ``IncompatibleCheckpointError`` and
``UnreadableCheckpointError`` (checkpoints/), ``DataError`` (tasks/), and ``InputError`` here for
the runtime, methods and stages (``NonFiniteError``: a value that must be finite is not). Only
errors the project itself raises about its input are user errors; any other exception, from this
project's code, a task's or a library's, is a bug and keeps its traceback (exit 1).
"""

from influence.errors import UserError


class InputError(UserError):
    """A config, dataset or workdir the job cannot use; the message says how to fix it."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The start of a library error's message, for a one-line error of our own: tensorstore's
    run to several kB on one line, TF's gs:// errors over several."""
    text = str(error).strip()
    line = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    return line if len(line) <= limit else line[: limit - 1] + "…"


__all__ = ["InputError", "UserError", "first_line"]
