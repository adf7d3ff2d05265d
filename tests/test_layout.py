"""The layering rules of the code (ARCHITECTURE.md), checked on the imports themselves."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
    return modules


def sources(folder: str) -> list[Path]:
    found = sorted(path for path in (ROOT / folder).rglob("*.py") if "migrations" not in path.parts)
    assert found, f"no module under {folder}/"  # a rule checked on nothing proves nothing
    return found


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [("tasks/kinds", "apps"), ("apps", "tasks")],
    ids=["a kind reaches the platform only through its context", "apps never import tasks"],
)
def test_no_module_imports_across_the_rule(folder: str, forbidden: str) -> None:
    breaking = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] == forbidden)
        for path in sources(folder)
    }
    assert {path: modules for path, modules in breaking.items() if modules} == {}


def test_no_two_modules_share_a_name_that_means_two_things() -> None:
    names = [path.relative_to(ROOT).as_posix() for path in sources("apps") + sources("tasks") + sources("project")]
    for ambiguous in ("ai.py", "errors.py"):
        assert [name for name in names if name.endswith("/" + ambiguous)] == []
