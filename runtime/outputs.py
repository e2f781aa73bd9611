"""Files users open without this project: JSON and Parquet, written atomically by one process."""

import json
from typing import Any

import jax
import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath


def write_json(path: epath.PathLike, payload: dict[str, Any]) -> None:
    """Process 0 writes ``payload``; a temp file + rename means readers never see half a file."""
    if jax.process_index() != 0:
        return
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)


def read_json(path: epath.PathLike) -> dict[str, Any]:
    return json.loads(epath.Path(path).read_text())


def write_parquet(path: epath.PathLike, table: pa.Table) -> None:
    """Atomic Parquet write (temp + rename): an existing file is always complete."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    with tmp.open("wb") as f:
        pq.write_table(table, f)
    tmp.replace(path)


def read_parquet_dir(directory: epath.PathLike, columns: list[str] | None = None) -> pa.Table:
    """All ``part-*.parquet`` files of a directory, in part order (only ``columns`` if given)."""
    files = sorted(epath.Path(directory).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no part-*.parquet files in {directory}")
    return pa.concat_tables([read_parquet(file, columns) for file in files])


def read_parquet(path: epath.PathLike, columns: list[str] | None = None) -> pa.Table:
    with epath.Path(path).open("rb") as f:
        return pq.read_table(f, columns=columns)


def write_text(path: epath.PathLike, text: str) -> None:
    """Process 0 writes ``text`` (UTF-8), atomically (temp + rename) like ``write_json``."""
    if jax.process_index() != 0:
        return
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
