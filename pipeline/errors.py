"""Errors that mean "the input is wrong": the job prints them as one line and exits 2."""

from checkpoints.checkpointer import CheckpointError
from parallel.mesh import MeshError


class InputError(ValueError):
    """A config, dataset or workdir the job cannot use; the message says how to fix it."""


USER_ERRORS = (InputError, CheckpointError, MeshError)
