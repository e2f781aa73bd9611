"""Where each stage keeps its results inside a workdir (layout 2).

    workdir/
      layout.json         {"layout": 2}, written when a stage first sets up in the workdir
      train_state/        Orbax: params + optimizer state (resume training)
      params/             Orbax: the trained params the analysis uses (meta: params_id)
      epoch_params/       Orbax: the params after each epoch of train.keep_epochs
      corrupted.parquet   the corrupted training examples: id and the task's ground-truth columns
      tensorboard/train/  the training loop's scalars
      methods/<name>/     one method's results (``config.method.name``; ':' becomes '.'):
        fitted/           Orbax: its fitted artifact (eigenpairs or an operator's state)
        fit.json          the fit's summary (eigenvalues, Ritz residuals, HVPs, ...)
        krylov/ ...       a method's own resumable state (Arnoldi's Krylov basis)
        scores/<split>/part-XXXXX-of-YYYYY.parquet, scores/meta.json,
        scores/influence_topk.parquet
        metrics.json, roc_pr.png, spectrum.png, tensorboard/<loop>/
        explain/          jobs.explain: explanations.parquet, tokens.parquet, explain.md

Every method keeps its results in the same place, so several methods can share one workdir and
its trained params. A workdir written by the first layout (Arnoldi's results at the top, no
layout.json) is refused with one line before anything is written into it.
"""

import json
import secrets

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from runtime import storage
from runtime.errors import InputError, first_line

LAYOUT = 2
LAYOUT_JSON = "layout.json"
TRAIN_STATE = "train_state"
PARAMS = "params"
EPOCH_PARAMS = "epoch_params"
CORRUPTED = "corrupted.parquet"
METHODS = "methods"
FITTED = "fitted"
FIT_JSON = "fit.json"
SCORES = "scores"
SCORES_META = "scores/meta.json"
METRICS_JSON = "metrics.json"
EXPLAIN = "explain"  # jobs.explain's outputs, rewritten by each run
QUERY_RETRIEVAL_JSON = (
    "query_retrieval.json"  # evaluate: traced queries against their relevant examples
)
ROC_PR_PNG = "roc_pr.png"
SPECTRUM_PNG = "spectrum.png"
# What only the first layout kept at the top of a workdir: Arnoldi's results (trained params are
# where they were, and a workdir holding only them, copied to run more methods, is of either).
_FIRST_LAYOUT = ("krylov", "eigenpairs", "scores", "eigenvalues.json")


def results(workdir: epath.PathLike, method: str) -> epath.Path:
    """The directory of method ``method``'s results (a method of one's own is named by its import
    path, ``package.module:ATTRIBUTE``)."""
    return epath.Path(workdir) / METHODS / method.replace(":", ".")


def claim(workdir: epath.PathLike) -> None:
    """``check`` the workdir, then ``mark`` it (a stage's set-up does both, with its own checks
    between them)."""
    check(workdir)
    mark(workdir)


def check(workdir: epath.PathLike) -> None:
    """Refuse a workdir of another layout, before anything reads or writes it: one of the first
    layout (its results stay as they are; the stages would not find them, and would write beside
    them), or one marked with another version."""
    directory = epath.Path(workdir)
    marker = directory / LAYOUT_JSON
    if marker.exists():
        layout = json.loads(marker.read_text()).get("layout")
        if layout != LAYOUT:
            raise InputError(
                f"--workdir={workdir} has layout {layout}, this version reads layout {LAYOUT}; "
                "use a new --workdir"
            )
        return
    old = [name for name in _FIRST_LAYOUT if (directory / name).exists()]
    if old:
        raise InputError(
            f"--workdir={workdir} was written by an earlier version of this project (layout 1: "
            f"{', '.join(old)} at its top, no {LAYOUT_JSON}); its results stay as they are: use "
            "a new --workdir (its params/ may be copied into it)"
        )


def mark(workdir: epath.PathLike) -> None:
    """Write layout.json into the workdir if it has none (process 0)."""
    directory = epath.Path(workdir)
    marker = directory / LAYOUT_JSON
    if jax.process_index() == 0 and not marker.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{LAYOUT_JSON}.tmp"
        tmp.write_text(json.dumps({"layout": LAYOUT}))
        tmp.replace(marker)


def ensure_writable(workdir: epath.PathLike) -> None:
    """Create the workdir and prove this process can write to it, before any expensive work."""
    directory = epath.Path(workdir)
    probe = directory / f".write-probe-{jax.process_index()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:  # any failure to write the probe: not writable
        reason = storage.refusal(e)
        if reason is not None and str(workdir).startswith("gs://"):
            raise InputError(storage.refused_message(str(workdir), reason)) from e
        reason = reason or (e.strerror if isinstance(e, OSError) else None) or first_line(e)
        raise InputError(
            f"--workdir={workdir} is not writable ({reason}); give a directory this job "
            "can write to (a finished workdir can be copied elsewhere to run more jobs on it)"
        ) from e


SHARED_PROBE = ".shared-probe"


def ensure_shared(workdir: epath.PathLike) -> None:
    """Several processes: prove each sees what process 0 writes in the workdir, before any work.

    Process 0 alone writes the tokenizer, the Parquet parts' index and ``layout.json``, which the
    others then read; on a node-local directory (a SLURM node's ``/tmp``, a TPU VM's boot disk)
    each host would silently work in a workdir of its own. Process 0 writes a random token, every
    process reads it back, and all of them learn who could not (one line, the same on each).
    """
    if jax.process_count() == 1:
        return
    probe = epath.Path(workdir) / SHARED_PROBE
    token = np.frombuffer(secrets.token_bytes(8), np.uint32).copy()
    token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    text = token.tobytes().hex()
    if jax.process_index() == 0:
        probe.write_text(text)
    multihost_utils.sync_global_devices("influence:shared-probe-written")
    try:
        seen = probe.read_text() == text
    except Exception:  # missing or unreadable: not shared
        seen = False
    flags = np.asarray(multihost_utils.process_allgather(np.array([seen])))
    multihost_utils.sync_global_devices("influence:shared-probe-read")
    if jax.process_index() == 0:
        probe.unlink(missing_ok=True)
    blind = [i for i, ok in enumerate(flags.reshape(-1)) if not ok]
    if blind:
        raise InputError(
            f"--workdir={workdir} is not shared: process(es) {blind} of {jax.process_count()} "
            "cannot read what process 0 wrote there; give every host the same directory (NFS, "
            "Lustre, a GCS bucket as gs://...), not a node-local path"
        )
