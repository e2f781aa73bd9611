"""The config blocks of the stages, with their defaults and meaning; each method declares its own
beside it (``methods/<name>.py``), and ``configs/common.base_config`` assembles them all.

Whether a block changes the trained params is declared here (``runtime/config.Block``): the train
stage's fingerprint leaves out every field of a block that does not, and counts every other field,
a task's own blocks included (``checkpoints/fingerprint.training``).
"""

from collections.abc import Iterable

import ml_collections

from methods import registry
from runtime.config import Block

RUN = Block(
    "",
    {
        "task": "",  # import path of the task module (tasks/base.py); aliases: tasks/registry.py
        "model": "",  # model name within the task
        "seed": 0,  # data split, label flips, param init, training order
        "l2": 0.0,  # L2 coefficient: in the training loss and the Hessian (H + l2·I)
    },
    trains=True,
)
LOGGING = Block("", {"log_every_secs": 10.0})  # progress lines and TensorBoard scalars

# The task's data (a task of one's own may replace the block with its own fields).
DATA = Block(
    "data", {"source": "", "num_train": 0, "num_eval": 0, "flip_fraction": 0.0}, trains=True
)

TRAIN = Block(
    "train",
    {
        "num_epochs": 1,
        "batch_size": 128,
        "learning_rate": 1e-3,
        "checkpoint_every": 0,  # steps between training checkpoints; 0: once per epoch
        # Epochs after which the params are also kept (<workdir>/epoch_params/<epoch>; epochs
        # past num_epochs are never reached): the checkpoints method.name=tracin sums over.
        "keep_epochs": (),
    },
    trains=True,
    exempt=("train.checkpoint_every", "train.keep_epochs"),
)

# Data filtering (tasks/filtering.py): train on the `keep` fraction of the training split with the
# lowest `by` score of the finished run in workdir `scores` (by="random": a seeded random subset of
# the same size, the control). keep=1: the whole split. What is kept enters the params'
# fingerprint as the task's (the digest of the kept positions), not through this block.
FILTER = Block("filter", {"keep": 1.0, "by": "self_influence", "scores": "", "seed": 0})

# Influence over a subset of the parameters (influence/selection.py): regexes matched against whole
# leaf paths such as "decoder/layers_3/attention/query/kernel"; "" = the task's default (every leaf
# unless the task says otherwise; ".*" selects every leaf explicitly). last_fraction > 0: of those,
# only the last layers in the model's forward order holding at least this fraction of their
# parameters, whole layers at a time (the paper's "top 10% / 20% of parameters", Table 6); needs a
# task that orders its layers (Task.param_rank).
PARAMS = Block("params", {"include": "", "exclude": "", "last_fraction": 0.0})

MESH = Block(
    "mesh",
    {
        "data": -1,  # devices on the batch axis; -1: the rest
        "model": 1,  # devices that split large param leaves, Krylov basis, eigenvectors
        "num_devices": -1,  # use the first k devices (single process); -1: all
        "num_slices": 1,  # TPU slices (or hosts on a slower network): 'data' spans them
        "min_shard_size": 2**18,  # leaves smaller than this stay replicated
    },
)

# How H⁻¹ is approximated (methods/registry.py): a built-in method or module:ATTRIBUTE of a method
# of one's own; its results go to <workdir>/methods/<name>/. Each method declares the other
# fields of this block that it reads.
METHOD = Block("method", {"name": registry.DEFAULT})

# How the score stage treats an eigenpair method's eigenvalues.
DISTILL = Block(
    "distill",
    {
        # Added to every eigenvalue when scoring: influence through (H + damping·I)⁻¹.
        "damping": 0.0,
        # The complement of the top-p̃ eigenspace as an isotropic 1/σ (influence/scoring.tail_sigma):
        # "none"; "damping": σ = l2 + damping; "ritz": from the Ritz values beyond p̃. Adds the
        # *_tail columns beside the plain scores (costs ‖∇ℓ(x)‖² and the query gradients' products).
        "tail": "none",
    },
)

SCORE = Block(
    "score",
    {
        "batch_size": 256,  # global examples per products call
        "examples_per_shard": 2048,  # rows per output Parquet file (unit of resumption)
        # g = G∇ℓ(x) by JVPs along the p̃ eigenvectors ("forward": memory ∝ tangent chunk × batch
        # activations) or by per-example gradients and one GEMM ("reverse": ~1 backward pass per
        # example whatever p̃, memory ∝ rows per call × params); "auto" times both on the first
        # batch and keeps the faster. A compatible change on resume (the scores agree to 1e-4).
        "mode": "auto",
        # Per-device working memory of one scoring call (XLA's count); forward mode chunks tangents
        # and reverse mode splits batches into calls to stay under it. 0: half the free memory.
        "memory_budget_mb": 0.0,
        "tangent_chunk": 0,  # >0: forward mode's tangents per chunk, as given; 0: fitted
        # Where G's eigenvectors (and the query gradients, v̄) live while scoring: "device", or
        # "host" memory, streamed to forward mode a chunk at a time (a 1B–8B model's G does not
        # fit in HBM); "auto": on the devices if they take at most half the memory budget.
        "eigvecs_storage": "auto",
        "read_threads": 2,  # threads reading/decoding batches ahead; 0: read inline
        "read_ahead": 4,  # batches read ahead of the one on the devices
        "num_queries": 16,  # eval examples traced back to their top training examples
        "top_k": 10,  # proponents and opponents kept per query
        # Queries scored against one training part at once: memory is (part rows × query_block)
        # floats plus (num_queries × top_k) candidates, whatever the number of queries and examples.
        "query_block": 1024,
        # Influence of every training example on the mean loss of the eval split, ⟨∇ℓ(x), P v̄⟩
        # (column validation_influence; jobs.evaluate ranks by its negative): the protocol of
        # DataInf and HyperINF. Costs one pass over the eval split and one more tangent.
        "validation": False,
        # Self-influence of every example. The methods that solve (H + λI)x = ∇ℓ(x) per example
        # (lissa, cg, hyperinf, datainf) can skip it (False): their rows then carry the query and
        # validation influences only, and jobs.evaluate ranks by validation_influence.
        "self_influence": True,
    },
)
# The score fields that change the rows (the others change only how they are computed).
SCORES_FINGERPRINT = (
    "score.examples_per_shard",
    "score.num_queries",
    "score.top_k",
    "score.validation",
    "score.self_influence",
    "distill.damping",
    "distill.tail",
)

# The report job (stages/report.py): these methods, those that keep p̃ eigenpairs at every p̃ of
# top_ks (a method that cannot run on the task, e.g. exact on a large model or tracin without
# train.keep_epochs, and one whose fit or scoring stops with an error, e.g. a LiSSA that diverges,
# is a note).
REPORT = Block(
    "report",
    {
        "methods": (
            "arnoldi",
            "randproj",
            "randselect",
            "exact",
            "graddot",
            "tracin",
            "lissa",
            "ekfac",
        ),
        "top_ks": (5, 10, 20, 50, 100),
        "converged_tol": 1e-2,  # relative Ritz residual of a converged pair
    },
)

STAGES = (RUN, DATA, TRAIN, FILTER, PARAMS, MESH, METHOD, DISTILL, SCORE, REPORT, LOGGING)


def all_blocks(config: ml_collections.ConfigDict | None = None) -> Iterable[Block]:
    """The stages' blocks and every built-in method's, and the configured method's own (a method
    of one's own declares its fields too)."""
    yield from STAGES
    yield from registry.blocks()
    if config is not None and "method" in config:
        yield from registry.of(config).config
