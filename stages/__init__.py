"""The stages: each module is one job's logic, ``run(config, workdir)`` (train, fit, score,
evaluate, report); ``jobs/`` only parses flags.

TensorFlow (imported by tfds, for TFDS sources) reads these at import; set them before anything
imports it.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
