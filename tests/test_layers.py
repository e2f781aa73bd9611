"""The dependency rule of the layout: each layer imports only the layers below it.

    influence → parallel → checkpoints, runtime → tasks, methods → scoring → stages → jobs
    (configs, launch, benchmarks, examples on top)

Every import of every module of the project, top-level or inside a function, is read from its
source (``ast``), so a lazy import that goes up a layer is found too. Modules of one layer may
import each other.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LAYERS = (
    ("influence",),
    ("parallel",),
    ("checkpoints", "runtime"),
    ("tasks", "methods"),
    ("scoring",),
    ("stages",),
    ("jobs",),
    ("configs", "launch", "benchmarks", "examples"),
)
LAYER = {package: level for level, packages in enumerate(LAYERS) for package in packages}


def imported_packages(source: str) -> set[str]:
    """The project's top-level packages that ``source`` imports (absolute imports only)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in LAYER)
    return found


def upward_imports(root: Path) -> list[str]:
    """'<file>: <package> (layer i) imports <package> (layer j > i)' for every violation."""
    found = []
    for package, level in LAYER.items():
        for path in sorted((root / package).rglob("*.py")):
            for other in sorted(imported_packages(path.read_text())):
                if LAYER[other] > level:
                    found.append(
                        f"{path.relative_to(root)}: {package} (layer {level}) imports {other} "
                        f"(layer {LAYER[other]})"
                    )
    return found


def test_every_package_is_in_a_layer() -> None:
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    assert packages <= set(LAYER), f"packages without a layer: {sorted(packages - set(LAYER))}"


def test_no_import_goes_up_a_layer() -> None:
    assert upward_imports(REPO) == []


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("influence/pytree.py", "from parallel import sharding"),
        ("methods/base.py", "from stages import workdir"),
        ("runtime/outputs.py", "    from tasks import registry  # inside a function"),
    ],
)
def test_an_upward_import_is_found(tmp_path: Path, module: str, line: str) -> None:
    """The rule holds against a copy of the tree with one upward import added."""
    for package in LAYER:
        if (REPO / package).is_dir():
            (tmp_path / package).symlink_to(REPO / package)
    target = tmp_path / module
    target.parent.unlink()
    (tmp_path / module.split("/")[0]).mkdir()
    source = (REPO / module).read_text()
    if line.startswith(" "):
        line = "def _lazy():\n" + line
    target.write_text(source + "\n" + line + "\n")
    assert [v for v in upward_imports(tmp_path) if v.startswith(module)]
