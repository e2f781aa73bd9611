"""Storage refusals as one line: a workdir on ``gs://`` (or any epath) that says no.

Writes to Cloud Storage fail through TensorFlow's filesystem (``tf.errors.PermissionDeniedError``
and friends, whose message is a multi-line gRPC status), through tensorstore (a ``ValueError``
whose message holds ``PERMISSION_DENIED`` or an HTTP 401/403), or, on a local disk, as an
``OSError`` (EACCES, EROFS). The job binary turns any of them into one line naming the path and
the fix (``jobs/cli.py``) instead of a traceback from inside a library.
"""

import errno

from runtime.errors import first_line

_REFUSED_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)
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


def refusal(error: BaseException) -> str | None:
    """The first line of ``error`` (or of what caused it) when it is storage refusing access."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        refused = (
            (isinstance(current, OSError) and current.errno in _REFUSED_ERRNOS)
            or type(current).__name__ in _REFUSED_TYPES
            or any(text in str(current) for text in _REFUSED_TEXT)
        )
        if refused:
            return first_line(current)
        current = current.__cause__ or current.__context__
    return None


def refused_message(path: str, reason: str) -> str:
    """The one line for a refused workdir."""
    return (
        f"storage refused access to --workdir={path} ({reason}); give the job's account read "
        "and write access there (for gs://, roles/storage.objectAdmin on the bucket) or choose "
        "another --workdir, then run the same command again"
    )
