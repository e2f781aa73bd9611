"""Where each stage keeps its results inside a workdir, and what each result depends on.

    workdir/
      train_state/   Orbax: params + optimizer state per epoch (resume training)
      params/        Orbax: the trained params the analysis uses (meta: params_id)
      epoch_params/  Orbax: the params after each epoch of train.keep_epochs (TracIn's checkpoints)
      corrupted.parquet   the corrupted training examples: id and the task's ground-truth columns
      krylov/        Orbax: Krylov basis + Hessenberg matrix every k iterations
      eigenpairs/    Orbax: distilled eigenvectors G, eigenvalues, Ritz residuals
      eigenvalues.json
      scores/<split>/part-XXXXX-of-YYYYY.parquet, scores/meta.json, scores/influence_topk.parquet
      metrics.json, roc_pr.png, spectrum.png, tensorboard/
      methods/<name>/     the same results of another method (config.method.name): eigenpairs/,
                          eigenvalues.json, scores/, metrics.json, roc_pr.png, spectrum.png

A stage's fingerprint lists the config fields that change its result; a saved result is reused only
if its fingerprint matches (``checkpoints.fingerprint.check``).
"""

from typing import Any

import jax
import ml_collections
from etils import epath

from checkpoints import fingerprint
from influence.selection import Selection
from runtime.errors import InputError

TRAIN_STATE = "train_state"
PARAMS = "params"
EPOCH_PARAMS = "epoch_params"
KRYLOV = "krylov"
EIGENPAIRS = "eigenpairs"
SCORES = "scores"
SCORES_META = "scores/meta.json"
EIGENVALUES_JSON = "eigenvalues.json"
METRICS_JSON = "metrics.json"
CORRUPTED = "corrupted.parquet"
ROC_PR_PNG = "roc_pr.png"
SPECTRUM_PNG = "spectrum.png"
# Results that belong to one method: Arnoldi's at the top of the workdir (where they were before
# there were methods), any other method's under methods/<name>/.
METHOD_RESULTS = (EIGENPAIRS, SCORES, EIGENVALUES_JSON, METRICS_JSON, ROC_PR_PNG, SPECTRUM_PNG)


def method_name(config: ml_collections.ConfigDict) -> str:
    block = config.get("method")
    return block.name if block is not None else "arnoldi"


def result(config: ml_collections.ConfigDict, name: str) -> str:
    """Where result ``name`` of the configured method lives, relative to the workdir."""
    method = method_name(config)
    if method == "arnoldi" or name.split("/")[0] not in METHOD_RESULTS:
        return name
    return f"methods/{method.replace(':', '.')}/{name}"


def result_path(
    config: ml_collections.ConfigDict, workdir: epath.PathLike, name: str
) -> epath.Path:
    return epath.Path(workdir) / result(config, name)


def path(workdir: epath.PathLike, name: str) -> epath.Path:
    return epath.Path(workdir) / name


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


NOT_TRAINING = (
    "mesh",
    "params",
    "arnoldi",
    "distill",
    "score",
    "log_every_secs",
    "filter",
    "method",
    "report",
)
"""Config blocks that do not change the trained params (layout, and the stages after training);
every other field does, including any block a task of its own reads (a new stage's block is
added here). ``filter`` does change them, through what it keeps: ``tasks/filtering.py`` puts
the digest of the kept examples into the task's fingerprint."""
NOT_TRAINING_FIELDS = ("train.checkpoint_every", "train.keep_epochs")


def flat(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
    """{'data.num_train': 4000, ...}: a config (block) as one level of dotted names."""
    result: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict | dict):
            result.update(flat(value, f"{name}."))
        else:
            result[name] = list(value) if isinstance(value, tuple) else value
    return result


def train_fingerprint(
    config: ml_collections.ConfigDict, task_fingerprint: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Every field that changes the trained params: the whole config but ``NOT_TRAINING``, plus
    what the task says its params also depend on (``Task.fingerprint``, e.g. a tokenizer)."""
    fields = {
        k: v
        for k, v in flat(config).items()
        if k.split(".")[0] not in NOT_TRAINING and k not in NOT_TRAINING_FIELDS
    }
    fields.update({f"task.{k}": v for k, v in (task_fingerprint or {}).items()})
    return fields


def params_id(train_fingerprint: dict[str, Any]) -> str:
    """Trained params are a deterministic function of the train fingerprint, so its digest names them."""
    return fingerprint.digest(train_fingerprint)


def selection_fingerprint(selection: Selection) -> dict[str, str]:
    """The parameter leaves influence covers: the paths ``params.include``/``exclude`` resolved to
    (two patterns selecting the same leaves are the same run)."""
    digest = fingerprint.digest({"paths": list(selection.selected)})
    return {
        "params.selected": f"{len(selection.selected)} of {len(selection.paths)} leaves ({digest})"
    }


def krylov_fingerprint(
    config: ml_collections.ConfigDict, params_id: str, selection: Selection
) -> dict[str, Any]:
    a = config.arnoldi
    return {
        "task": config.task,
        "model": config.model,
        "params_id": params_id,
        **selection_fingerprint(selection),
        "l2": config.l2,
        "arnoldi.num_iters": a.num_iters,
        "arnoldi.hvp_batch_size": a.hvp_batch_size,
        "arnoldi.fixed_batch": a.fixed_batch,
        "arnoldi.seed": a.seed,
        "arnoldi.breakdown_tol": a.breakdown_tol,
        "arnoldi.orthogonalization": a.orthogonalization,
    }


def eigenpairs_fingerprint(
    config: ml_collections.ConfigDict, params_id: str, selection: Selection
) -> dict[str, Any]:
    d = config.distill
    return {
        **krylov_fingerprint(config, params_id, selection),
        "distill.top_k": d.top_k,
        "distill.positive_only": d.positive_only,
        "distill.symmetric": d.symmetric,
    }


def fit_fingerprint(
    config: ml_collections.ConfigDict, params_id: str, selection: Selection, method: Any
) -> dict[str, Any]:
    """What a method's artifact depends on: Arnoldi's as ``eigenpairs_fingerprint`` (unchanged,
    so workdirs saved before there were methods keep theirs); any other method's: the params,
    the selection, l2, its name and its own fields (``methods.base.Method.fingerprint``)."""
    if method.name == "arnoldi":
        return eigenpairs_fingerprint(config, params_id, selection)
    return {
        "task": config.task,
        "model": config.model,
        "params_id": params_id,
        **selection_fingerprint(selection),
        "l2": config.l2,
        "method.name": method.name,
        **method.fingerprint(config),
    }


def scores_fingerprint(config: ml_collections.ConfigDict, eigenpairs_id: str) -> dict[str, Any]:
    """The damping, the tail and the protocol flags count only when set, so scores saved before
    they existed keep their fingerprint."""
    d = config.distill
    return {
        "eigenpairs_id": eigenpairs_id,
        **flat(config.data, "data."),
        "seed": config.seed,
        "score.examples_per_shard": config.score.examples_per_shard,
        "score.num_queries": config.score.num_queries,
        "score.top_k": config.score.top_k,
        **({"distill.damping": d.damping} if d.damping else {}),
        **({"distill.tail": d.tail} if d.tail != "none" else {}),
        **({"score.validation": True} if config.score.get("validation") else {}),
        **({"score.self_influence": False} if not config.score.get("self_influence", True) else {}),
    }
