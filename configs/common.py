"""Fields shared by every experiment, with their meaning; experiment files fill in the values."""

from typing import Any

import ml_collections


def parse_preset(arg: str | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """'model=flax_cnn,runlocal' → {'model': 'flax_cnn', 'runlocal': True, ...defaults}.

    Unknown preset names are an error: a typo must not silently run the default.
    """
    preset = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config preset {key!r}; known presets: {sorted(defaults)}")
        if isinstance(defaults[key], bool):
            preset[key] = value.lower() not in ("0", "false", "no") if value else True
        else:
            preset[key] = type(defaults[key])(value)
    return preset


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = ""  # module in tasks/registry.py
    config.model = ""  # model name within the task
    config.seed = 0  # data split, label flips, param init, training order
    config.l2 = 0.0  # L2 coefficient: in the training loss and the Hessian (H + l2·I)

    config.data = ml_collections.ConfigDict()
    config.data.source = ""
    config.data.num_train = 0
    config.data.num_eval = 0
    config.data.flip_fraction = 0.0

    config.train = ml_collections.ConfigDict()
    config.train.num_epochs = 1
    config.train.batch_size = 128
    config.train.learning_rate = 1e-3
    config.train.checkpoint_every = 0  # steps between training checkpoints; 0: once per epoch

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # devices on the batch axis; -1: the rest
    config.mesh.model = 1  # devices that split large param leaves, Krylov basis, eigenvectors
    config.mesh.num_devices = -1  # use the first k devices (single process); -1: all
    config.mesh.min_shard_size = 2**18  # leaves smaller than this stay replicated

    config.arnoldi = ml_collections.ConfigDict()
    config.arnoldi.num_iters = 100  # n, Arnoldi iterations (Alg. 1)
    config.arnoldi.hvp_batch_size = 512  # b, examples per HVP (global)
    config.arnoldi.fixed_batch = False  # True: every HVP on the same batch (exact Krylov space)
    config.arnoldi.seed = 0  # start vector and HVP batch draws
    config.arnoldi.breakdown_tol = 1e-4  # ‖w‖/‖Hq‖ below this: invariant subspace, stop early
    config.arnoldi.orthogonalization = "mgs2"  # Gram–Schmidt twice: "mgs2" or "cgs2" (see README)
    config.arnoldi.checkpoint_every = 10  # save the Krylov state every k iterations

    config.distill = ml_collections.ConfigDict()
    config.distill.top_k = 20  # p̃, eigenpairs kept
    config.distill.positive_only = False  # keep the p̃ largest positive λ instead of largest |λ|
    config.distill.symmetric = True  # eigh of the symmetrised Hessenberg block (else general eig)

    config.score = ml_collections.ConfigDict()
    config.score.batch_size = 256  # global examples per JVP call
    config.score.examples_per_shard = 2048  # rows per output Parquet file (unit of resumption)
    config.score.tangent_chunk = 0  # >0: JVP tangents in chunks of this size (bounds memory)
    config.score.num_queries = 16  # eval examples traced back to their top training examples
    config.score.top_k = 10  # proponents and opponents kept per query

    config.log_every_secs = 10.0  # progress lines and TensorBoard scalars
    return config
