"""The dependency direction web -> daemon -> engine, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_engine_never_imports_daemon_or_web() -> None:
    offenders = []
    for path in sorted((REPO / "engine").rglob("*.py")):
        for name in _imported_modules(path):
            if name.startswith(("stackwatch.daemon", "stackwatch.web", "aiohttp", "watchdog", "sqlite3", "asyncio")):
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert not offenders, offenders


def test_daemon_never_imports_web_at_module_level() -> None:
    # The service hands itself to the web app; the CLI's `run` command may import web lazily.
    offenders = []
    for path in sorted((REPO / "daemon").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stackwatch.web"):
                offenders.append(f"{path.relative_to(REPO)} imports {node.module}")
    assert not offenders, offenders


def test_every_package_folder_is_listed_in_pyproject() -> None:
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(data["tool"]["setuptools"]["packages"])
    mapping = data["tool"]["setuptools"]["package-dir"]
    for package, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            name = ".".join([package, *rel.parts]) if rel.parts else package
            assert name in listed, f"{name} is not listed in [tool.setuptools] packages"
