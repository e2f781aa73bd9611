"""Fields shared by every experiment, with their meaning; experiment files fill in the values."""

from collections.abc import Sequence
from typing import Any

import ml_collections

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class Preset(dict):
    """Preset values by name (defaults filled in); ``given`` holds the names the user wrote."""

    given: frozenset[str] = frozenset()


def parse_preset(arg: str | None, defaults: dict[str, Any]) -> Preset:
    """'model=flax_cnn,runlocal' → {'model': 'flax_cnn', 'runlocal': True, ...defaults}.

    Strict, because a typo must not silently run something else: an unknown name, a boolean that
    is not one of true/false/yes/no/on/off/1/0 (``runlocal=flase``), a value that does not parse
    as the default's type, or a name given twice is an error naming the preset (see
    ``check_choice`` for presets that name one of a fixed set).
    """
    preset, given = Preset(defaults), set()
    for item in filter(None, (arg or "").split(",")):
        key, has_value, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config preset {key!r}; known presets: {sorted(defaults)}")
        if key in given:
            raise ValueError(f"config preset {key!r} given twice in {arg!r}")
        given.add(key)
        default = defaults[key]
        if isinstance(default, bool):
            if has_value and value.lower() not in TRUE + FALSE:
                raise ValueError(
                    f"config preset {key}={value!r} is not a boolean; write {key} (true), "
                    f"{key}=true or {key}=false"
                )
            preset[key] = not has_value or value.lower() in TRUE
            continue
        try:
            preset[key] = type(default)(value)
        except ValueError:
            preset[key] = None
        if not value or preset[key] is None:
            raise ValueError(
                f"config preset {key}={value!r} is not a valid {type(default).__name__} "
                f"(e.g. {key}={default})"
            )
    preset.given = frozenset(given)
    return preset


def check_choice(preset: Preset, key: str, choices: Sequence[str]) -> None:
    """A string preset must name one of ``choices`` (a model, a dataset ...)."""
    if preset[key] not in choices:
        raise ValueError(f"config preset {key}={preset[key]!r} is not one of {sorted(choices)}")


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = ""  # import path of the task module (tasks/base.py); aliases: tasks/registry.py
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
    # Epochs after which the params are also kept (<workdir>/epoch_params/<epoch>; epochs past
    # num_epochs are never reached): the checkpoints method.name=tracin sums over. Does not
    # change the trained params.
    config.train.keep_epochs = ()

    # Data filtering (tasks/filtering.py): train on the `keep` fraction of the training split
    # with the lowest `by` score of the finished run in workdir `scores` (by="random": a seeded
    # random subset of the same size, the control). keep=1: the whole split.
    config.filter = ml_collections.ConfigDict()
    config.filter.keep = 1.0
    config.filter.by = "self_influence"
    config.filter.scores = ""
    config.filter.seed = 0

    # Influence over a subset of the parameters (influence/selection.py): regexes matched against
    # whole leaf paths such as "decoder/layers_3/attention/query/kernel"; "" = the task's default
    # (every leaf unless the task says otherwise; ".*" selects every leaf explicitly).
    config.params = ml_collections.ConfigDict()
    config.params.include = ""
    config.params.exclude = ""
    # > 0: of those, only the last layers in the model's forward order holding at least this
    # fraction of their parameters, whole layers at a time (the paper's "top 10% / 20% of
    # parameters", Table 6); needs a task that orders its layers (Task.param_rank).
    config.params.last_fraction = 0.0

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # devices on the batch axis; -1: the rest
    config.mesh.model = 1  # devices that split large param leaves, Krylov basis, eigenvectors
    config.mesh.num_devices = -1  # use the first k devices (single process); -1: all
    config.mesh.num_slices = 1  # TPU slices (or hosts on a slower network): 'data' spans them
    config.mesh.min_shard_size = 2**18  # leaves smaller than this stay replicated

    # How H⁻¹ is approximated (methods/registry.py): "arnoldi" (the paper's), the baselines
    # "randproj", "randselect", "exact", "graddot", "tracin", "lissa", "cg", the per-layer
    # "hyperinf" and "datainf", or module:ATTRIBUTE of a method of your own.
    # Results of a method other than arnoldi go to <workdir>/methods/<name>/.
    config.method = ml_collections.ConfigDict()
    config.method.name = "arnoldi"
    config.method.seed = 0  # randproj's Gaussian G, randselect's coordinates, their HVP batches
    config.method.max_params = 20_000  # exact: the largest p whose p × p Hessian it builds
    config.method.chunk = 64  # exact: Hessian columns per vmapped HVP call
    # lissa, cg: they solve (H + damping·I) x = v (H includes l2); hyperinf, datainf: the
    # constant added to each layer's λ_l = damping_ratio · mean of its squared gradient entries.
    config.method.damping = 1e-3
    config.method.damping_ratio = 0.1  # hyperinf, datainf (the papers' 0.1)
    config.method.hvp_batch_size = 512  # lissa: examples per HVP step; cg: per HVP call
    config.method.depth = 1000  # lissa: recursion steps per repeat
    config.method.repeats = 1  # lissa: independent recursions averaged
    config.method.scale = 0.0  # lissa: s ≥ λ_max(H + damping); 0: estimated (power iteration)
    config.method.block = 64  # lissa, cg: vectors solved by one vmapped HVP call
    config.method.tol = 1e-4  # cg: relative residual; hyperinf: Schulz's residual ‖I − AX‖
    config.method.max_iters = 200  # cg, hyperinf (Schulz): iteration cap (a warning if hit)
    config.method.max_layer_params = 16_384  # hyperinf: GFIM side d; datainf: layer size p_l

    config.arnoldi = ml_collections.ConfigDict()
    config.arnoldi.num_iters = 100  # n, Arnoldi iterations (Alg. 1)
    config.arnoldi.hvp_batch_size = 512  # b, examples per HVP (global)
    config.arnoldi.fixed_batch = False  # True: every HVP on the same batch (exact Krylov space)
    config.arnoldi.seed = 0  # start vector and HVP batch draws
    config.arnoldi.breakdown_tol = 1e-4  # ‖w‖/‖Hq‖ below this: invariant subspace, stop early
    # Gram–Schmidt: "mgs2" or "cgs2" (twice), "dgks" (MGS, second pass when needed); see README
    config.arnoldi.orthogonalization = "mgs2"
    config.arnoldi.checkpoint_every = 10  # save the Krylov state every k iterations

    config.distill = ml_collections.ConfigDict()
    config.distill.top_k = 20  # p̃, eigenpairs kept
    config.distill.positive_only = False  # keep the p̃ largest positive λ instead of largest |λ|
    config.distill.symmetric = True  # eigh of the symmetrised Hessenberg block (else general eig)
    # Added to every eigenvalue when scoring: influence through (H + damping·I)⁻¹.
    config.distill.damping = 0.0
    # The complement of the top-p̃ eigenspace as an isotropic 1/σ (influence/scoring.tail_sigma):
    # "none"; "damping": σ = l2 + damping; "ritz": from the Ritz values beyond p̃. Adds the
    # *_tail columns beside the plain scores (costs ‖∇ℓ(x)‖² and the query gradients' products).
    config.distill.tail = "none"

    config.score = ml_collections.ConfigDict()
    config.score.batch_size = 256  # global examples per JVP call
    config.score.examples_per_shard = 2048  # rows per output Parquet file (unit of resumption)
    # g = G∇ℓ(x) by JVPs along the p̃ eigenvectors ("forward": memory ∝ tangent chunk × batch
    # activations) or by per-example gradients and one GEMM ("reverse": ~1 backward pass per
    # example whatever p̃, memory ∝ rows per call × params); "auto" times both on the first batch
    # and keeps the faster. A compatible change on resume (the scores agree to 1e-4).
    config.score.mode = "auto"
    # Per-device working memory of one scoring call (XLA's count); forward mode chunks tangents
    # and reverse mode splits batches into calls to stay under it. 0: half the free memory.
    config.score.memory_budget_mb = 0.0
    config.score.tangent_chunk = 0  # >0: forward mode's tangents per chunk, as given; 0: fitted
    config.score.read_threads = 2  # threads reading/decoding batches ahead; 0: read inline
    config.score.read_ahead = 4  # batches read ahead of the one on the devices
    config.score.num_queries = 16  # eval examples traced back to their top training examples
    config.score.top_k = 10  # proponents and opponents kept per query
    # Queries scored against one training part at once: memory is (part rows × query_block) floats
    # plus (num_queries × top_k) candidates, whatever the number of queries and examples.
    config.score.query_block = 1024
    # Influence of every training example on the mean loss of the eval split, ⟨∇ℓ(x), P v̄⟩
    # (column validation_influence; jobs.evaluate ranks by its negative): the protocol of DataInf
    # and HyperINF. Costs one pass over the eval split and one more tangent.
    config.score.validation = False
    # Self-influence of every example. The methods that solve (H + λI)x = ∇ℓ(x) per example
    # (lissa, cg, hyperinf, datainf) can skip it (False): their rows then carry the query and
    # validation influences only, and jobs.evaluate ranks by validation_influence.
    config.score.self_influence = True

    # The report job (stages/report.py): these methods, the first three at every p̃ of top_ks
    # (exact only where the model is small enough, tracin only with train.keep_epochs; a method
    # whose fit or scoring stops with an error, e.g. a LiSSA that diverges, is a note).
    config.report = ml_collections.ConfigDict()
    config.report.methods = (
        "arnoldi",
        "randproj",
        "randselect",
        "exact",
        "graddot",
        "tracin",
        "lissa",
    )
    config.report.top_ks = (5, 10, 20, 50, 100)
    config.report.converged_tol = 1e-2  # relative Ritz residual of a converged pair

    config.log_every_secs = 10.0  # progress lines and TensorBoard scalars
    return config
