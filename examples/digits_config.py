"""The config of the bring-your-own-model example (``examples/digits.py``): any config file works
that fills ``configs.common.base_config()`` and names its task by import path.

  python -m jobs.pipeline --config=examples/digits_config.py --workdir=workdirs/digits
  # influence over the output layer only:
  python -m jobs.pipeline --config=examples/digits_config.py --workdir=workdirs/digits_out \
      --config.params.include='out/.*'
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
    config = common.base_config()
    config.task = "examples.digits"  # any importable module with get_task(config, workdir)
    config.seed = 0
    config.l2 = 1e-3
    config.data = ml_collections.ConfigDict(  # the task's own block: it reads what it defines
        {"num_train": 1280, "flip_fraction": 0.1, "hidden": 32}
    )
    config.train.num_epochs = 40
    config.train.batch_size = 128
    config.train.learning_rate = 1e-2
    config.arnoldi.num_iters = 60
    config.arnoldi.hvp_batch_size = 512
    config.distill.top_k = 20
    config.score.batch_size = 128
    config.score.examples_per_shard = 512
    config.score.num_queries = 8
    return config
