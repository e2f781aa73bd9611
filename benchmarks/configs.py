"""What the benchmarks share: reading a config file as the jobs' ``--config`` does."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_config(spec: str):
    """``configs/x.py[:presets]`` → its ``get_config(presets)``, as the jobs' --config reads it."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("benchmark_config", REPO / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
