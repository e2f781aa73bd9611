"""The stages' input checks, before any expensive work: each failure is one line saying what to
change (the methods' own are ``methods/checks.py`` and each method's ``check``)."""

import ml_collections
from jax.sharding import Mesh

from influence import scoring
from methods import checks, registry
from methods.base import Kind
from parallel import products
from runtime.errors import InputError
from tasks.base import Task


def check_train(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    checks.divisible(config.train.batch_size, mesh, "train.batch_size")
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


def _check_eigvecs_storage(config: ml_collections.ConfigDict) -> None:
    """``score.eigvecs_storage``: a known place; host streams to forward mode only, and only a
    method's eigenvectors and query gradients (an operator method solves on the devices)."""
    s, storages = config.score, ("auto", "device", "host")
    if s.eigvecs_storage not in storages:
        raise InputError(
            f"score.eigvecs_storage={s.eigvecs_storage!r}; choose one of {', '.join(storages)}"
        )
    if s.eigvecs_storage != "host":
        return
    if s.mode == "reverse":
        raise InputError(
            "score.eigvecs_storage=host streams the tangents to forward mode, and "
            "score.mode=reverse reads them all for every batch; set score.mode=forward (or "
            "auto), or score.eigvecs_storage=device"
        )
    if registry.of(config).kind is Kind.OPERATOR:
        raise InputError(
            f"score.eigvecs_storage=host: method {registry.of(config).name} scores through its operator "
            "on the devices and has no eigenvectors to stream; set score.eigvecs_storage=device"
        )


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


def check_score(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    s = config.score
    checks.divisible(s.batch_size, mesh, "score.batch_size")
    if s.examples_per_shard < 1:
        raise InputError(f"score.examples_per_shard={s.examples_per_shard} must be positive")
    if s.read_threads < 0 or s.read_ahead < 1:
        raise InputError("score.read_threads must be >= 0 and score.read_ahead >= 1")
    if s.tangent_chunk < 0:
        raise InputError(f"score.tangent_chunk={s.tangent_chunk} must be 0 (off) or positive")
    if s.mode not in products.MODES:
        raise InputError(f"score.mode={s.mode!r}; choose one of {', '.join(products.MODES)}")
    _check_eigvecs_storage(config)
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
    if d.tail != "none" and s.num_queries > checks.MAX_TAIL_QUERIES:
        raise InputError(
            f"distill.tail={d.tail} with score.num_queries={s.num_queries}: the tail's train → "
            "test needs every query's gradient as an extra tangent (or GEMM column) and stores "
            f"num_queries products per training example, so it takes at most {checks.MAX_TAIL_QUERIES} "
            "queries; lower score.num_queries, or set distill.tail=none to trace any number"
        )
    if d.tail == "damping":
        try:
            scoring.tail_sigma(d.tail, l2=config.l2, damping=d.damping, ritz_values=[], top_k=0)
        except ValueError as e:
            raise InputError(str(e)) from e
