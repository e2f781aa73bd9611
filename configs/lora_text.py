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

METHODS = ("hyperinf", "datainf", "lissa", "arnoldi", "graddot", "tracin", "cg")
PRESETS = {"method": "hyperinf", "runlocal": False, "layers": 6}
CHOICES = {"method": METHODS}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = common.parse_preset(arg, PRESETS)
    common.check_choice(preset, "method", CHOICES["method"])
    config = common.base_config()
    config.task = "lora_text"
    config.model = "minilm"
    config.seed = 0
    config.l2 = 0.0

    config.encoder = ml_collections.ConfigDict()
    config.encoder.num_layers = int(preset["layers"])
    config.lora = ml_collections.ConfigDict()
    config.lora.targets = r"layer_\d+/attention/(query|value)"
    config.lora.rank = 8
    config.lora.alpha = 16.0
    config.lora.rslora = False  # scale α/r; True: α/√r

    config.data.num_train = 2000
    config.data.num_eval = 500
    config.data.flip_fraction = 0.2
    config.data.max_len = 40  # tokens with [CLS] and [SEP]: 90% of the snippets fit

    config.train.num_epochs = 3
    config.train.batch_size = 32
    config.train.learning_rate = 1e-3
    config.train.keep_epochs = (1, 2, 3)  # tracin's checkpoints

    config.method.name = preset["method"]
    config.method.hvp_batch_size = 64
    config.method.depth = 100
    config.method.damping = 1e-3  # hyperinf, datainf: added to λ_l (the papers' mislabel runs)
    config.arnoldi.num_iters = 50
    config.arnoldi.hvp_batch_size = 64
    config.arnoldi.checkpoint_every = 10
    config.distill.top_k = 20

    config.score.batch_size = 32
    config.score.examples_per_shard = 1024
    config.score.num_queries = 8
    config.score.validation = True
    if config.method.name in ("lissa", "cg"):
        # A solve per training example (depth × a batch of HVPs): the validation gradient alone
        # is solved (one vector: blocks of 1), the validation protocol only. The LoRA Hessian
        # has negative curvature (Lanczos: λ_min ≈ −0.58 at these params, −0.69 at runlocal's):
        # LiSSA needs λ above it, and stops in one line before any solve if it is not.
        config.score.self_influence = False
        config.score.num_queries = 0
        config.method.block = 1
        config.method.damping = 1.0

    if preset["runlocal"]:
        if "layers" not in preset.given:
            config.encoder.num_layers = 2
        config.data.num_train = 256
        config.data.num_eval = 64
        config.data.max_len = 32
        config.train.num_epochs = 4
        config.train.keep_epochs = (2, 4)
        config.train.batch_size = 32
        config.train.learning_rate = 3e-3  # train accuracy 0.76 with 20% flipped (0.62 at 1e-3)
        config.arnoldi.num_iters = 12
        config.arnoldi.hvp_batch_size = 32
        config.arnoldi.checkpoint_every = 4
        config.distill.top_k = 8
        config.method.hvp_batch_size = 32
        config.method.depth = 20
        config.score.examples_per_shard = 128
    return config
