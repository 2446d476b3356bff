"""Issue 27: the package's layers import downward only, and the layers below orchestration never load Prefect.

    cli, __init__, flows (an alias)  ->  orchestration, testing  ->  dataset, emulator  ->  engine  ->
    settings  ->  api  ->  storage

Every import counts, lazy ones inside functions too (read from the source, not from what happens to load)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "prefect_anthropic"

LAYERS = {
    "storage": 0,
    "lazy": 0,
    "api": 1,
    "settings": 2,
    "engine": 3,
    "dataset": 4,
    "emulator": 4,
    "orchestration": 5,
    "testing": 5,
    "cli": 6,
    "__init__": 6,
    "flows": 6,
}
#: Layers that run without Prefect: the data path in plain asyncio (blocks are read at the edge, above them).
WITHOUT_PREFECT = {"storage", "api", "settings", "engine", "dataset", "emulator"}


def room(module: str) -> str:
    """A module's layer name: its first part below the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if not node.module]
    return found


def test_imports_run_downward_only():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = room(module_name(path))
        for line, target in imports_of(path):
            if not target.startswith("prefect_anthropic.") or target == "prefect_anthropic":
                continue
            if LAYERS[room(target)] > LAYERS[source]:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} ({source}) imports {target}")
    assert not upward, "\n".join(upward)


def test_the_engine_imports_only_the_api_and_the_settings():
    allowed = {"engine", "api", "settings"}
    stray = [
        f"{path.relative_to(PACKAGE)}:{line} imports {target}"
        for path in sorted((PACKAGE / "engine").rglob("*.py"))
        for line, target in imports_of(path)
        if target.startswith("prefect_anthropic.") and room(target) not in allowed
    ]
    assert not stray, "\n".join(stray)


def test_the_layers_below_orchestration_never_import_prefect():
    found = [
        f"{path.relative_to(PACKAGE)}:{line} imports {target}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if room(module_name(path)) in WITHOUT_PREFECT
        for line, target in imports_of(path)
        if target == "prefect" or target.startswith("prefect.")
    ]
    assert not found, "\n".join(found)
