"""The test tree's layout: a test module imports what it shares from a helpers module or a conftest,
never from another test module (that would run, or half-run, the other module's tests' setup and tie
two test files together)."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def is_test_module(module: str) -> bool:
    path = TESTS.parent / (module.replace(".", "/") + ".py")
    return path.name.startswith("test_") and path.is_file()


def test_no_test_file_imports_from_a_test_module():
    offenders = {str(path.relative_to(TESTS.parent)): sorted(filter(is_test_module, imported_modules(path)))
                 for path in sorted(TESTS.rglob("*.py"))}
    assert {path: modules for path, modules in offenders.items() if modules} == {}
