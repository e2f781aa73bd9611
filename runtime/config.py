"""Config blocks: each module declares the fields it reads, with their defaults, and whether they
change the trained params; the base config (``configs/common.py``) assembles the declarations.

A block may be declared by several modules (``method`` by every method that reads one of its
fields, ``distill`` by Arnoldi and by the score stage): the declarations are merged, and two that
give one field different defaults are a bug, found when the config is assembled. The fields of a
block that does not change training are left out of the trained params' fingerprint
(``checkpoints/fingerprint.training``); every other field counts, including any block a task of
one's own reads (``config.data``, or a block the task adds).
"""

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections


@dataclasses.dataclass(frozen=True)
class Block:
    """Fields of config block ``name`` ("" for top-level fields) with their defaults.

    Attributes:
      trains: the fields change the trained params (``train``, ``data``, ``seed``, ...).
      exempt: fields of a training block that do not (``train.checkpoint_every``), dotted.
    """

    name: str
    defaults: Mapping[str, Any]
    trains: bool = False
    exempt: tuple[str, ...] = ()

    def dotted(self, field: str) -> str:
        return f"{self.name}.{field}" if self.name else field


def assemble(blocks: Iterable[Block]) -> ml_collections.ConfigDict:
    """One config from the blocks' declarations, in the order first declared."""
    merged: dict[str, dict[str, Any]] = {}
    trains: dict[str, bool] = {}
    for block in blocks:
        if block.name and trains.setdefault(block.name, block.trains) != block.trains:
            raise ValueError(f"config block {block.name!r} declared both training and not")
        fields = merged.setdefault(block.name, {})
        for field, default in block.defaults.items():
            if field in fields and fields[field] != default:
                raise ValueError(
                    f"config field {block.dotted(field)} declared with defaults {fields[field]!r} "
                    f"and {default!r}"
                )
            fields[field] = default
    config = ml_collections.ConfigDict()
    for name, fields in merged.items():
        if name:
            config[name] = ml_collections.ConfigDict(fields)
        else:
            config.update(fields)
    return config


def not_training(blocks: Iterable[Block]) -> tuple[frozenset[str], frozenset[str]]:
    """(names of the blocks whose fields do not change training, single fields that do not)."""
    blocks = list(blocks)
    whole = {b.name for b in blocks if not b.trains and b.name}
    single = {b.dotted(f) for b in blocks if not b.trains and not b.name for f in b.defaults}
    single |= {field for b in blocks for field in b.exempt}
    return frozenset(whole), frozenset(single)


def flat(config: ml_collections.ConfigDict | Mapping, prefix: str = "") -> dict[str, Any]:
    """{'data.num_train': 4000, ...}: a config (block) as one level of dotted names, tuples as
    lists (as JSON keeps them)."""
    result: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict | Mapping):
            result.update(flat(value, f"{name}."))
        else:
            result[name] = list(value) if isinstance(value, tuple) else value
    return result


def value(config: ml_collections.ConfigDict, dotted: str) -> Any:
    """The value of field ``dotted`` ("method.damping") of ``config``."""
    node = config
    for part in dotted.split("."):
        node = node[part]
    return list(node) if isinstance(node, tuple) else node
