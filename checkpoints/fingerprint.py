"""Fingerprints: what a saved result was computed from, checked before it is reused.

Every fingerprint of the project is computed here. A fingerprint is a flat JSON dict of the
fields that change the saved result; reusing a result compares it field by field and names the
first difference, so a user who changed ``arnoldi.num_iters`` on a workdir with a saved Krylov
state learns exactly that, and the state on disk is left untouched. The results form a chain,
each naming the one before by its digest:

- trained params (``training``): every config field but those of the blocks that declare they do
  not change training (``runtime/config.py``), plus what the task adds (a tokenizer's digest, the
  examples a filter kept); its digest is the ``params_id``;
- a method's fit (``fit``): the params id, the parameter leaves selected, l2, the method's name
  and the config fields it names; a method's resumable state (Arnoldi's Krylov state) is
  fingerprinted the same way with the fields it depends on;
- scores (``scores``): the fit's digest and the score fields that change the rows.

``content`` digests bytes (a tokenizer model, the positions a filter keeps).
"""

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_collections

from checkpoints.checkpointer import IncompatibleCheckpointError
from runtime import config as config_lib

Fingerprint = dict[str, Any]
# How to get past a saved state whose fingerprint differs (the state itself is never touched).
FIX = "use a new --workdir, or restore the config the saved state was computed with"


def digest(fields: Fingerprint) -> str:
    """A short stable hash of a fingerprint (used as an id, e.g. of trained params)."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def content(data: bytes) -> str:
    """A short stable hash of some bytes (a tokenizer model, kept positions)."""
    return hashlib.sha256(data).hexdigest()[:16]


def fields(
    config: ml_collections.ConfigDict, names: Iterable[str], prefix: str = ""
) -> Fingerprint:
    """The values of the named config fields (dotted paths), keyed by ``prefix`` + their paths
    (the prefix names the block ``config`` is)."""
    return {prefix + name: config_lib.value(config, name) for name in names}


def training(
    config: ml_collections.ConfigDict,
    blocks: Iterable[config_lib.Block],
    task: dict[str, Any] | None = None,
) -> Fingerprint:
    """Every field that changes the trained params: the whole config but the fields ``blocks``
    declare do not, plus what the task says its params also depend on (``Task.fingerprint``)."""
    whole, single = config_lib.not_training(blocks)
    result = {
        k: v
        for k, v in config_lib.flat(config).items()
        if k.split(".")[0] not in whole and k not in single
    }
    result.update({f"task.{k}": v for k, v in (task or {}).items()})
    return result


def selection(selected: Sequence[str], num_leaves: int) -> Fingerprint:
    """The parameter leaves influence covers: the paths ``params.include``/``exclude`` resolved
    to (two patterns selecting the same leaves are the same run)."""
    paths = digest({"paths": list(selected)})
    return {"params.selected": f"{len(selected)} of {num_leaves} leaves ({paths})"}


def fit(
    config: ml_collections.ConfigDict,
    params_id: str,
    selected: Fingerprint,
    method: str,
    names: Iterable[str],
) -> Fingerprint:
    """What a method's fit (or its resumable state) depends on: the params, the selected leaves,
    l2 (in every Hessian), the method's name and the config fields ``names``."""
    return {
        "task": config.task,
        "model": config.model,
        "params_id": params_id,
        **selected,
        "l2": config.l2,
        "method.name": method,
        **fields(config, names),
    }


def scores(config: ml_collections.ConfigDict, fit_id: str, names: Iterable[str]) -> Fingerprint:
    """What the scores depend on: the fit (its digest) and the score fields ``names``."""
    return {"fit_id": fit_id, **fields(config, names)}


def check(saved: Fingerprint, expected: Fingerprint, what: str, fix: str) -> None:
    """Raise IncompatibleCheckpointError naming the first field where ``saved`` and ``expected``
    differ."""
    for key in sorted(set(saved) | set(expected)):
        if saved.get(key) != expected.get(key):
            raise IncompatibleCheckpointError(
                f"{what} was computed with {key}={saved.get(key)!r} but the config gives "
                f"{key}={expected.get(key)!r}; {fix}"
            )


def meta_check(expected: Fingerprint, what: str, fix: str) -> Callable[[dict[str, Any]], None]:
    """The ``check_meta`` of ``Checkpointer.restore_latest``: ``check`` the saved meta's
    fingerprint against ``expected``."""
    return lambda meta: check(meta["fingerprint"], expected, what, fix)
