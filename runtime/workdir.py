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

Every method keeps its results in the same place, so several methods can share one workdir and
its trained params. A workdir written by the first layout (Arnoldi's results at the top, no
layout.json) is refused with one line before anything is written into it.
"""

import json

import jax
from etils import epath

from runtime.errors import InputError

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
    except OSError as e:
        raise InputError(
            f"--workdir={workdir} is not writable ({e.strerror or e}); give a directory this job "
            "can write to (a finished workdir can be copied elsewhere to run more jobs on it)"
        ) from e
