"""The errors that mean "the input is wrong": the job prints them as one line and exits 2.

Only errors the project itself raises about its input are listed; any other exception, from this
project's code, a task's or a library's, is a bug and keeps its traceback (exit 1).
"""

from checkpoints.checkpointer import IncompatibleCheckpointError, UnreadableCheckpointError
from parallel.distributed import DistributedError
from parallel.mesh import MeshError
from parallel.products import MemoryBudgetError
from tasks.sources import DataError


class InputError(Exception):
    """A config, dataset or workdir the job cannot use; the message says how to fix it."""


USER_ERRORS = (
    InputError,
    DataError,
    MeshError,
    MemoryBudgetError,
    DistributedError,
    IncompatibleCheckpointError,
    UnreadableCheckpointError,
)
