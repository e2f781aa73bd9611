"""Config fingerprints: what a saved state was computed from, checked before it is reused.

A fingerprint is a flat JSON dict of the fields that change the saved result (model, params id,
n, b, seed, ...). Resuming compares it field by field and names the first difference, so a user who
changed ``arnoldi.num_iters`` on a workdir with a saved Krylov state learns exactly that, and the
state on disk is left untouched.
"""

import hashlib
import json
from collections.abc import Callable
from typing import Any

from checkpoints.checkpointer import IncompatibleCheckpointError


def digest(fields: dict[str, Any]) -> str:
    """A short stable hash of a fingerprint (used as an id, e.g. of trained params)."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check(saved: dict[str, Any], expected: dict[str, Any], what: str, fix: str) -> None:
    """Raise IncompatibleCheckpointError naming the first field where ``saved`` and ``expected``
    differ."""
    for key in sorted(set(saved) | set(expected)):
        if saved.get(key) != expected.get(key):
            raise IncompatibleCheckpointError(
                f"{what} was computed with {key}={saved.get(key)!r} but the config gives "
                f"{key}={expected.get(key)!r}; {fix}"
            )


def meta_check(expected: dict[str, Any], what: str, fix: str) -> Callable[[dict[str, Any]], None]:
    """The ``check_meta`` of ``Checkpointer.restore_latest``: ``check`` the saved meta's
    fingerprint against ``expected``."""
    return lambda meta: check(meta["fingerprint"], expected, what, fix)
