"""The base config every experiment file starts from, and strict presets (big_vision style).

Each field is declared, with its default and meaning, by the module that reads it (the stages'
blocks in ``stages/blocks.py``, each method's beside it in ``methods/``); ``base_config``
assembles them, and an experiment file fills in the values."""

from collections.abc import Sequence
from typing import Any

import ml_collections

from runtime import config as config_lib
from stages import blocks

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


# The pod-slice layout of the paper's large runs: every large param leaf, the Krylov basis and the
# eigenvectors sharded over a 'model' axis of all devices (mesh.data = 1), n = 200 iterations of
# b = 4,096 examples, scoring in batches of 1,024.
POD = {
    "arnoldi.num_iters": 200,
    "arnoldi.hvp_batch_size": 4096,
    "mesh.data": 1,
    "mesh.model": -1,
    "mesh.min_shard_size": 2**16,
    "score.batch_size": 1024,
}


def apply(config: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
    """Set the dotted fields of ``values`` (a preset's overrides: ``{"data.num_train": 256}``)."""
    for dotted, value in values.items():
        *blocks, field = dotted.split(".")
        node = config
        for block in blocks:
            node = node[block]
        node[field] = value


def base_config() -> ml_collections.ConfigDict:
    """Every field of every stage and built-in method with its default (``stages/blocks.py`` and
    each method's ``Method.config``; the meaning of each field is written beside it there)."""
    return config_lib.assemble(blocks.all_blocks())
