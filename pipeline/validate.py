"""Checks that run before any expensive work: each failure is one line saying what to change."""

import ml_collections
from jax.sharding import Mesh

from influence import arnoldi, scoring
from parallel import projection
from parallel.mesh import DATA_AXIS
from pipeline.errors import InputError
from tasks.base import Task


def _divisible(value: int, by: int, field: str, mesh_field: str = "mesh.data") -> None:
    if value < 1 or value % by:
        raise InputError(
            f"{field}={value} is not a positive multiple of the {by} devices on the 'data' axis; "
            f"change {field} or {mesh_field}"
        )


def check_divisible(value: int, mesh: Mesh, field: str) -> None:
    """A global batch size of ``field`` splits evenly over the 'data' axis."""
    _divisible(value, mesh.shape[DATA_AXIS], field)


def check_train(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    _divisible(config.train.batch_size, mesh.shape[DATA_AXIS], "train.batch_size")
    if config.train.checkpoint_every < 0:
        raise InputError(
            f"train.checkpoint_every={config.train.checkpoint_every} must be 0 (once per epoch) "
            "or a positive number of steps"
        )
    if config.train.num_epochs < 1:
        raise InputError(f"train.num_epochs={config.train.num_epochs} must be at least 1")
    if any(e < 1 for e in config.train.keep_epochs):
        raise InputError(
            f"train.keep_epochs={tuple(config.train.keep_epochs)}: epochs count from 1 (the "
            "params after the first epoch)"
        )


def check_arnoldi(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    a, d = config.arnoldi, config.distill
    if a.num_iters < 1:
        raise InputError(f"arnoldi.num_iters={a.num_iters} must be at least 1")
    if not 1 <= d.top_k <= a.num_iters:
        raise InputError(
            f"distill.top_k={d.top_k} must be between 1 and arnoldi.num_iters={a.num_iters} "
            "(p̃ ≤ n: Arnoldi yields at most n eigenpairs); lower top_k or raise num_iters"
        )
    check_hvp_batch(config, mesh)
    if a.orthogonalization not in arnoldi.ORTHOGONALIZATION:
        raise InputError(
            f"arnoldi.orthogonalization={a.orthogonalization!r}; choose one of "
            f"{sorted(arnoldi.ORTHOGONALIZATION)}"
        )
    if a.checkpoint_every < 1:
        raise InputError(f"arnoldi.checkpoint_every={a.checkpoint_every} must be at least 1")


def check_hvp_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """HVP batches (every method that takes HVPs draws them like Arnoldi) split over 'data'."""
    _divisible(config.arnoldi.hvp_batch_size, mesh.shape[DATA_AXIS], "arnoldi.hvp_batch_size")


def check_sizes(config: ml_collections.ConfigDict, task: Task) -> None:
    """Batches drawn from the training split must fit in it (the task knows its size)."""
    num_train = task.splits["train"].num_examples
    for field, value in (
        ("train.batch_size", config.train.batch_size),
        ("arnoldi.hvp_batch_size", config.arnoldi.hvp_batch_size),
    ):
        if value > num_train:
            raise InputError(
                f"{field}={value} exceeds the {num_train} training examples of task "
                f"{config.task!r}; lower {field} or use more training data"
            )


# Queries the tail's train → test takes (each one more tangent per example and one more stored float).
MAX_TAIL_QUERIES = 256


def check_score(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    s = config.score
    _divisible(s.batch_size, mesh.shape[DATA_AXIS], "score.batch_size")
    if s.examples_per_shard < 1:
        raise InputError(f"score.examples_per_shard={s.examples_per_shard} must be positive")
    if s.read_threads < 0 or s.read_ahead < 1:
        raise InputError("score.read_threads must be >= 0 and score.read_ahead >= 1")
    if s.tangent_chunk < 0:
        raise InputError(f"score.tangent_chunk={s.tangent_chunk} must be 0 (off) or positive")
    if s.mode not in projection.MODES:
        raise InputError(f"score.mode={s.mode!r}; choose one of {', '.join(projection.MODES)}")
    if s.memory_budget_mb < 0:
        raise InputError(
            f"score.memory_budget_mb={s.memory_budget_mb} must be 0 (half the free memory) or "
            "positive"
        )
    if s.num_queries < 0 or s.top_k < 1 or s.query_block < 1:
        raise InputError(
            "score.num_queries must be >= 0, score.top_k >= 1 and score.query_block >= 1"
        )
    d = config.distill
    if d.tail not in scoring.TAILS:
        raise InputError(f"distill.tail={d.tail!r}; choose one of {', '.join(scoring.TAILS)}")
    if not d.damping >= 0:
        raise InputError(f"distill.damping={d.damping} must be >= 0")
    if d.tail != "none" and s.num_queries > MAX_TAIL_QUERIES:
        raise InputError(
            f"distill.tail={d.tail} with score.num_queries={s.num_queries}: the tail's train → "
            "test needs every query's gradient as an extra tangent (or GEMM column) and stores "
            f"num_queries products per training example, so it takes at most {MAX_TAIL_QUERIES} "
            "queries; lower score.num_queries, or set distill.tail=none to trace any number"
        )
    if d.tail == "damping":
        try:
            scoring.tail_sigma(d.tail, l2=config.l2, damping=d.damping, ritz_values=[], top_k=0)
        except ValueError as e:
            raise InputError(str(e)) from e
