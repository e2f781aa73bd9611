r"""Checks a multi-process launch in seconds, before a long run finds out hours in.

  python -m jobs.preflight --workdir=gs://bucket/mnist [--distributed=on]

Run by every process of the job, as the job itself would be (``launch/tpu_pod.sh preflight``;
``launch/gpu_slurm.sbatch`` runs it before the job):

- the workdir: every process can write to it and sees what process 0 writes there (the checks
  every job makes first, ``jobs/cli.py``);
- the code: a digest of the source files under ``--source_root`` (default: this repository) is
  the same on every process. Workers set up from different trees (a setup that failed on some,
  an edit on one node's copy) otherwise run different programs that hang in a collective or
  write results that do not fit together;
- the devices: a sum of one 1 per device over a mesh of every device of every process equals
  the device count, so every device takes part in a collective across hosts (and slices).

On success process 0 prints one line (processes, devices, the code's digest) and every process
exits 0. Bad input, a workdir that is not shared or code that differs: one line, exit 2. A wrong
sum (a broken interconnect): one line, exit 1.
"""

import collections
import hashlib
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jobs import cli
from runtime.errors import InputError

REPOSITORY = Path(__file__).resolve().parents[1]
_SOURCE_ROOT = flags.DEFINE_string(
    "source_root",
    str(REPOSITORY),
    "The tree whose source files are compared across processes: this repository (the code that "
    "runs) unless another checkout is to be compared.",
)

# What makes up the code version: the sources and what installs them. Data, logs and results are
# not code; neither is what a process writes beside the code (byte code, a venv, build metadata).
SOURCE_SUFFIXES = (".py", ".sh", ".sbatch")
SOURCE_NAMES = ("setup.py", "setup.cfg", "pyproject.toml")


def _is_source(name: str) -> bool:
    return (
        name.endswith(SOURCE_SUFFIXES)
        or name in SOURCE_NAMES
        or (name.startswith("requirements") and name.endswith(".txt"))
    )


def _skipped(directory: Path) -> bool:
    """Hidden directories (.git, .venv, tool caches), byte code, build metadata and any virtual
    environment (``pyvenv.cfg``), whatever its name."""
    name = directory.name
    return (
        name.startswith(".")
        or name == "__pycache__"
        or name.endswith(".egg-info")
        or (directory / "pyvenv.cfg").exists()
    )


def source_files(root: Path) -> list[Path]:
    """The source files under ``root``, as sorted paths relative to it."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not _skipped(Path(directory) / d)]
        found += [Path(directory, f).relative_to(root) for f in files if _is_source(f)]
    return sorted(found)


def code_digest(root: Path) -> str:
    """SHA-256 over the source files' relative paths and contents: equal trees, equal digests
    (wherever they are checked out), and a renamed, added or edited file changes it."""
    files = source_files(root) if root.is_dir() else []
    if not files:
        raise InputError(f"--source_root={root} holds no source files (*.py, *.sh, setup files)")
    digest = hashlib.sha256()
    for relative in files:
        content = (root / relative).read_bytes()
        digest.update(f"{relative.as_posix()}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


def same_code(root: Path) -> str:
    """The digest of ``root``, after checking every process has the same one; otherwise one line
    naming the processes that differ from the most common digest (process 0's on a tie)."""
    digest = code_digest(root)
    words = np.frombuffer(bytes.fromhex(digest), np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(words))
    digests = [row.astype(np.uint32).tobytes().hex() for row in gathered.reshape(-1, words.size)]
    usual, _ = collections.Counter(digests).most_common(1)[0]
    differ = [i for i, d in enumerate(digests) if d != usual]
    if differ:
        raise InputError(
            f"workers run different code: process(es) {differ} of {len(digests)} have source "
            f"digest {digests[differ[0]][:12]}, the others {usual[:12]} (*.py, *.sh and setup "
            "files under --source_root): rerun setup (bash launch/tpu_pod.sh setup) so every "
            "worker has the same tree"
        )
    return digest


def sum_over_devices() -> int:
    """One 1 per device, summed over a mesh of every device: the value of each device must cross
    the interconnect (ICI, DCN or the hosts' network) for the total to be right."""
    devices = np.asarray(jax.devices())
    mesh = Mesh(devices, ("devices",))
    ones = jax.make_array_from_callback(
        (devices.size,),
        NamedSharding(mesh, PartitionSpec("devices")),
        lambda index: np.ones(devices.size, np.int32)[index],
    )
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(ones)
    value = int(np.asarray(total.addressable_data(0)))
    if value != devices.size:
        cli.fail(  # not the user's input: a failure, exit 1
            f"a sum of ones over all {devices.size} devices gave {value}: a collective across "
            "devices or hosts is broken; check the interconnect (and the slices' network)",
            code=1,
        )
    return value


def check(config: ml_collections.ConfigDict, workdir: str) -> None:
    """The stage ``cli.run_stages`` runs after its own workdir checks."""
    del config
    digest = same_code(Path(_SOURCE_ROOT.value))
    devices = sum_over_devices()
    if jax.process_index() == 0:
        print(
            f"preflight ok: {jax.process_count()} process(es), {devices} {jax.default_backend()} "
            f"device(s) summed, code {digest[:12]}, --workdir={workdir} writable and shared",
            flush=True,
        )


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a bad flag as one line (no --config: the checks need none)."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        cli.fail(f"bad command line: {e}")
    if not flags.FLAGS.workdir:
        cli.fail("--workdir is required")
    return rest


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {argv[1:]}")
    cli.start_runtime()
    cli.run_stages([check], ml_collections.ConfigDict(), flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
