r"""Mislabeled Rotten Tomatoes snippets under a LoRA-tuned MiniLM (issue 13; HyperINF §5.1).

Pretrained MiniLM-L6 (frozen), LoRA adapters on every layer's query and value, a linear head;
fresh vs rotten with 20% of the training labels flipped (``tasks/lora_text.py``). Influence over
the adapters; scored by self-influence and by influence on the mean validation loss (the
papers' protocol, ``score.validation``). The method is HyperINF unless ``method=`` says otherwise:

  python -m jobs.pipeline --config=configs/lora_text.py:runlocal --workdir=workdirs/lora_smoke
  python -m jobs.pipeline --config=configs/lora_text.py --workdir=workdirs/lora
  python -m jobs.pipeline --config=configs/lora_text.py:method=datainf --workdir=workdirs/lora
  python -m jobs.pipeline --config=configs/lora_text.py:method=arnoldi --workdir=workdirs/lora

(one workdir serves every method: the trained params are shared, each method's results go to
``methods/<name>/``). Presets, comma-separated after a colon:
  method=hyperinf|datainf|lissa|arnoldi|graddot|tracin|cg   config.method.name (default hyperinf)
  runlocal     a minutes-long smoke run: 2 pretrained layers, 256 training snippets, 32 tokens
  layers=N     the first N of MiniLM's 6 layers (default 6; runlocal 2)

Any field can be overridden with --config.<field>=<value> (``--config.lora.rank=16``,
``--config.lora.rslora=true``, ``--config.params.include='(lora|head)/.*'`` to add the head).
"""

import ml_collections

from configs import common
from methods import registry
from methods.base import Kind

METHODS = ("hyperinf", "datainf", "lissa", "arnoldi", "graddot", "tracin", "cg")
PRESETS = {"method": "hyperinf", "runlocal": False, "layers": 6}
CHOICES = {"method": METHODS}


# A minutes-long smoke run: 2 pretrained layers (unless layers= is given), 256 snippets, 32 tokens.
RUNLOCAL = {
    "data.num_train": 256,
    "data.num_eval": 64,
    "data.max_len": 32,
    "train.num_epochs": 4,
    "train.keep_epochs": (2, 4),
    "train.batch_size": 32,
    "train.learning_rate": 3e-3,  # train accuracy 0.76 with 20% flipped (0.62 at 1e-3)
    "arnoldi.num_iters": 12,
    "arnoldi.hvp_batch_size": 32,
    "arnoldi.checkpoint_every": 4,
    "distill.top_k": 8,
    "method.hvp_batch_size": 32,
    "method.depth": 20,
    "score.examples_per_shard": 128,
}
# A method that solves every vector at score time (lissa, cg: an operator with nothing fitted)
# costs a solve per training example (depth × a batch of HVPs): the validation gradient alone is
# solved (one vector: blocks of 1), the validation protocol only. The LoRA Hessian has negative
# curvature (Lanczos: λ_min ≈ −0.58 at these params, −0.69 at runlocal's): LiSSA needs λ above it,
# and stops in one line before any solve if it is not.
SOLVER = {
    "score.self_influence": False,
    "score.num_queries": 0,
    "method.block": 1,
    "method.damping": 1.0,
}


def _lora(config: ml_collections.ConfigDict, layers: int) -> None:
    """The task's own blocks: the encoder's depth and the adapters."""
    config.encoder = ml_collections.ConfigDict({"num_layers": layers})
    config.lora = ml_collections.ConfigDict()
    config.lora.targets = r"layer_\d+/attention/(query|value)"
    config.lora.rank = 8
    config.lora.alpha = 16.0
    config.lora.rslora = False  # scale α/r; True: α/√r


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = common.parse_preset(arg, PRESETS)
    common.check_choice(preset, "method", CHOICES["method"])
    config = common.base_config()
    layers = int(preset["layers"]) if "layers" in preset.given or not preset["runlocal"] else 2
    _lora(config, layers)
    common.apply(
        config,
        {
            "task": "lora_text",
            "model": "minilm",
            "seed": 0,
            "l2": 0.0,
            "data.num_train": 2000,
            "data.num_eval": 500,
            "data.flip_fraction": 0.2,
            "train.num_epochs": 3,
            "train.batch_size": 32,
            "train.learning_rate": 1e-3,
            "train.keep_epochs": (1, 2, 3),  # tracin's checkpoints
            "method.name": preset["method"],
            "method.hvp_batch_size": 64,
            "method.depth": 100,
            "method.damping": 1e-3,  # hyperinf, datainf: added to λ_l (the papers' mislabel runs)
            "arnoldi.num_iters": 50,
            "arnoldi.hvp_batch_size": 64,
            "arnoldi.checkpoint_every": 10,
            "distill.top_k": 20,
            "score.batch_size": 32,
            "score.examples_per_shard": 1024,
            "score.num_queries": 8,
            "score.validation": True,
        },
    )
    config.data.max_len = 40  # tokens with [CLS] and [SEP]: 90% of the snippets fit
    method = registry.get(preset["method"])
    if method.kind is Kind.OPERATOR and not method.saves_fit:
        common.apply(config, SOLVER)
    if preset["runlocal"]:
        common.apply(config, RUNLOCAL)
    return config
