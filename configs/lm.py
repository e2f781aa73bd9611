r"""A GPT-style language model trained from scratch on English Bible passages with made-up facts
planted in them: which training passages made the model say this? (``tasks/lm.py``.)

The planted facts' queries are the first eval examples and ``score.num_queries`` traces them all, so
the evaluate stage reports recall@10, MRR and AUC of the passages that state each fact; a seeded 3%
of the other passages have their words scrambled (the corruption self-influence looks for). Runs
train → fit → score → evaluate:

  python -m jobs.pipeline --config=configs/lm.py --workdir=workdirs/lm

Presets, comma-separated after a colon:
  model=tiny|small|base   GPT size (default small: 4 blocks of width 128, 1.1M params at vocab
                          2,000; base is GPT-2 small's shape); 4,096 passages of 2 verses,
                          12 epochs: about 7 minutes on 2 CPU cores
  top_k=N                 p̃, eigenpairs kept (default 32)
  runlocal                a run of a minute or two on 2 CPU cores (tiny model, 512 passages)
  pod                     GPT-2 small's shape, passages of 4 verses (max_len 256), the Krylov
                          basis and eigenvectors sharded over a 'model' axis of all devices

  # EK-FAC over the MLP layers (its Kronecker factors need 2-D Dense kernels):
  python -m jobs.pipeline --config=configs/lm.py --workdir=workdirs/lm \
      --config.method.name=ekfac --config.params.include='.*/mlp/.*'
  # a text file of one's own, one passage per line, 16 facts planted:
  python -m jobs.pipeline --config=configs/lm.py --workdir=workdirs/mytext \
      --config.data.source=text:/data/passages.txt --config.data.num_facts=16
"""

import ml_collections

from configs import common
from tasks.gpt import PRESETS as MODELS

PRESETS = {"model": "small", "top_k": 32, "runlocal": False, "pod": False}
CHOICES = {"model": tuple(MODELS)}

# A run of a minute or two on 2 CPU cores (tiny model unless model= is given).
RUNLOCAL = {
    "data.num_train": 512,
    "data.num_eval": 32,
    "data.num_facts": 8,
    "data.fact_copies": 3,
    "data.verses_per_passage": 1,
    "data.vocab_size": 400,
    "data.max_len": 64,
    "train.num_epochs": 3,
    "train.batch_size": 32,
    "arnoldi.num_iters": 12,
    "arnoldi.hvp_batch_size": 64,
    "arnoldi.checkpoint_every": 4,
    "score.batch_size": 64,
    "score.examples_per_shard": 256,
}
POD = {
    **common.POD,
    "data.num_train": 7936,  # the embedded corpus has 8,240 passages of 4 verses
    "data.num_eval": 256,
    "data.verses_per_passage": 4,
    "data.vocab_size": 8000,  # the embedded corpus has room for ~10.8k pieces; a larger one more
    "data.max_len": 256,
    "train.batch_size": 256,
    "score.examples_per_shard": 4096,
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
            "task": "lm",
            "model": preset["model"],
            "seed": 0,
            "l2": 1e-4,
            "data.source": "bible:4",
            "data.num_train": 4096,
            "data.num_eval": 256,
            "train.num_epochs": 12,
            "train.batch_size": 32,
            "train.learning_rate": 2e-3,
            "arnoldi.num_iters": 100,
            "arnoldi.hvp_batch_size": 256,
            "distill.top_k": int(preset["top_k"]),
            "score.batch_size": 128,
            "score.examples_per_shard": 2048,
            "score.top_k": 10,
        },
    )
    config.data.verses_per_passage = 2
    # 16 facts in 12 passages each (its 3 wordings 4 times): the small model memorises the
    # wordings trained on within 12 epochs; how much carries over to the paraphrased queries is
    # what the train job's eval_answered says (docs/results/lm.md).
    config.data.num_facts = 16
    config.data.fact_copies = 12
    config.data.scramble_fraction = 0.03
    config.data.vocab_size = 2000
    config.data.max_len = 96  # tokens, EOS included
    del config.data["flip_fraction"]
    if preset["runlocal"]:
        config.model = preset["model"] if "model" in preset.given else "tiny"
        common.apply(config, RUNLOCAL)
        config.distill.top_k = min(config.distill.top_k, 8)
    if preset["pod"]:
        common.apply(config, POD)
    config.score.num_queries = config.data.num_facts  # every planted fact's query is traced
    return config
