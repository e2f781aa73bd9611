"""Finding a method: ``config.method.name`` is a built-in name or ``module:ATTRIBUTE`` (default
attribute ``METHOD``) of a method of one's own; a name that is neither is a one-line error.

The one place a method is known by its name: nothing else in the project compares one.
"""

import importlib
from collections.abc import Iterator

import ml_collections

from methods.base import Method
from runtime.config import Block
from runtime.errors import InputError

DEFAULT = "arnoldi"  # the paper's method, for a config that names none
BUILTIN = {
    "arnoldi": "methods.arnoldi:ARNOLDI",
    "randproj": "methods.subspace:RANDPROJ",
    "randselect": "methods.subspace:RANDSELECT",
    "exact": "methods.exact:EXACT",
    "graddot": "methods.graddot:GRADDOT",
    "tracin": "methods.tracin:TRACIN",
    "lissa": "methods.lissa:LISSA",
    "cg": "methods.cg:CG",
    "hyperinf": "methods.hyperinf:HYPERINF",
    "datainf": "methods.datainf:DATAINF",
    "ekfac": "methods.ekfac:EKFAC",
}


def get(name: str) -> Method:
    """The method ``name``: built-in, or ``package.module[:ATTRIBUTE]`` holding a ``Method``."""
    path = BUILTIN.get(name, name)
    module_name, _, attribute = path.partition(":")
    fix = f"built-in methods: {', '.join(BUILTIN)}; or module:ATTRIBUTE of a Method of your own"
    if name not in BUILTIN and "." not in module_name:
        raise InputError(f"config.method.name={name!r} is not a method ({fix})")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not module_name.startswith(e.name):
            raise
        raise InputError(f"config.method.name={name!r}: no module {module_name!r} ({fix})") from e
    method = getattr(module, attribute or "METHOD", None)
    if not isinstance(method, Method):
        raise InputError(
            f"config.method.name={name!r}: {module_name}.{attribute or 'METHOD'} is not a "
            f"methods.base.Method ({fix})"
        )
    return method


def of(config: ml_collections.ConfigDict) -> Method:
    """The configured method (``DEFAULT`` for a config without a ``method`` block)."""
    block = config.get("method")
    return get(block.name if block is not None else DEFAULT)


def blocks() -> Iterator[Block]:
    """The config fields every built-in method declares (``Method.config``)."""
    for name in BUILTIN:
        yield from get(name).config
