"""Storage refusals as one line: a workdir on ``gs://`` (or any epath) that says no.

Writes to Cloud Storage fail through TensorFlow's filesystem (``tf.errors.PermissionDeniedError``
and friends, whose message is a multi-line gRPC status), through tensorstore (a ``ValueError``
whose message holds ``PERMISSION_DENIED`` or an HTTP 401/403), or, on a local disk, as an
``OSError`` (EACCES, EROFS). The job binary turns any of them into one line naming the path and
the fix (``jobs/cli.py``) instead of a traceback from inside a library.
"""

import errno
import os
from collections.abc import Iterator

from runtime.errors import first_line

_REFUSED_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = tuple(os.strerror(code) for code in _FULL_ERRNOS)  # tensorstore's, in its text
# Exception class names of TensorFlow's filesystem errors that mean "no access".
_REFUSED_TYPES = ("PermissionDeniedError", "UnauthenticatedError")
# Text of tensorstore's and the GCS client's errors that mean the same.
_REFUSED_TEXT = (
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "403 Forbidden",
    "401 Unauthorized",
    "HTTP response code: 403",
    "HTTP response code: 401",
    "does not have storage.objects",
)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what caused it, innermost last (libraries wrap storage errors)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def refusal(error: BaseException) -> str | None:
    """The first line of ``error`` (or of what caused it) when it is storage refusing access."""
    for e in _chain(error):
        if (
            (isinstance(e, OSError) and e.errno in _REFUSED_ERRNOS)
            or type(e).__name__ in _REFUSED_TYPES
            or any(text in str(e) for text in _REFUSED_TEXT)
        ):
            return first_line(e)
    return None


def full(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is the disk or quota running full."""
    return any(
        (isinstance(e, OSError) and e.errno in _FULL_ERRNOS)
        or any(text in str(e) for text in _FULL_TEXT)
        for e in _chain(error)
    )


def refused_message(path: str, reason: str) -> str:
    """The one line for a refused workdir."""
    return (
        f"storage refused access to --workdir={path} ({reason}); give the job's account read "
        "and write access there (for gs://, roles/storage.objectAdmin on the bucket) or choose "
        "another --workdir, then run the same command again"
    )
