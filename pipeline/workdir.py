"""Where each stage keeps its results inside a workdir, and what each result depends on.

    workdir/
      train_state/   Orbax: params + optimizer state per epoch (resume training)
      params/        Orbax: the trained params the analysis uses (meta: params_id)
      flipped_labels.parquet   the corrupted training examples: id, clean_label, noisy_label
      krylov/        Orbax: Krylov basis + Hessenberg matrix every k iterations
      eigenpairs/    Orbax: distilled eigenvectors G, eigenvalues, Ritz residuals
      eigenvalues.json
      scores/<split>/part-XXXXX-of-YYYYY.parquet, scores/meta.json, scores/influence_topk.parquet
      metrics.json, roc_pr.png, spectrum.png, tensorboard/

A stage's fingerprint lists the config fields that change its result; a saved result is reused only
if its fingerprint matches (``checkpoints.fingerprint.check``).
"""

from typing import Any

import jax
import ml_collections
from etils import epath

from checkpoints import fingerprint
from pipeline.errors import InputError

TRAIN_STATE = "train_state"
PARAMS = "params"
KRYLOV = "krylov"
EIGENPAIRS = "eigenpairs"
SCORES = "scores"
EIGENVALUES_JSON = "eigenvalues.json"
METRICS_JSON = "metrics.json"
FLIPPED_LABELS = "flipped_labels.parquet"


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


def train_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {
        "task": config.task,
        "model": config.model,
        "seed": config.seed,
        "l2": config.l2,
        **{f"data.{k}": v for k, v in config.data.items()},
        **{f"train.{k}": config.train[k] for k in ("num_epochs", "batch_size", "learning_rate")},
    }


def params_id(config: ml_collections.ConfigDict) -> str:
    """Trained params are a deterministic function of the train fingerprint, so its digest names them."""
    return fingerprint.digest(train_fingerprint(config))


def krylov_fingerprint(config: ml_collections.ConfigDict, params_id: str) -> dict[str, Any]:
    a = config.arnoldi
    return {
        "task": config.task,
        "model": config.model,
        "params_id": params_id,
        "l2": config.l2,
        "arnoldi.num_iters": a.num_iters,
        "arnoldi.hvp_batch_size": a.hvp_batch_size,
        "arnoldi.fixed_batch": a.fixed_batch,
        "arnoldi.seed": a.seed,
        "arnoldi.breakdown_tol": a.breakdown_tol,
        "arnoldi.orthogonalization": a.orthogonalization,
    }


def eigenpairs_fingerprint(config: ml_collections.ConfigDict, params_id: str) -> dict[str, Any]:
    d = config.distill
    return {
        **krylov_fingerprint(config, params_id),
        "distill.top_k": d.top_k,
        "distill.positive_only": d.positive_only,
        "distill.symmetric": d.symmetric,
    }


def scores_fingerprint(config: ml_collections.ConfigDict, eigenpairs_id: str) -> dict[str, Any]:
    return {
        "eigenpairs_id": eigenpairs_id,
        **{f"data.{k}": v for k, v in config.data.items()},
        "seed": config.seed,
        "score.examples_per_shard": config.score.examples_per_shard,
        "score.num_queries": config.score.num_queries,
        "score.top_k": config.score.top_k,
    }
