"""The package's imports point one way (DESIGN.md): no circles, the API sees the engine only through its
client surface, and the runner never imports code that rewrites the model. Read from the source, so
imports inside functions and under TYPE_CHECKING count too."""

import ast
from functools import cache
from pathlib import Path

import mistral_serve

PACKAGE_DIR = Path(mistral_serve.__file__).parent
# what api/ may import from engine/: the client surface and the request's parameter types
# the engine as the API may see it; the grammar bounds are plain checks of a request, which a pool keeps too
ENGINE_SURFACE = {"mistral_serve.engine.client", "mistral_serve.engine.params", "mistral_serve.engine.grammar_bounds"}
# the modules that rewrite a loaded model for inference (fusing, packing, swapping layers)
MODEL_REWRITERS = {"mistral_serve.model.prepare", "mistral_serve.model.fused", "mistral_serve.model.cpu.packed",
                   "mistral_serve.model.cpu.layers"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE_DIR.rglob("*.py") if "migrations" not in path.parts}


@cache
def imports_of(name: str) -> frozenset[str]:
    """The package's modules that `name` imports, anywhere in its source."""
    path = modules()[name]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            # `from package import module` imports the module; `from module import name` the module
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules() else base
                         for alias in node.names)
    return frozenset(module for module in found if module in modules() and module != name)


def reachable_from(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for imported in imports_of(todo.pop()):
            if imported not in seen:
                seen.add(imported)
                todo.append(imported)
    return seen


def test_the_package_has_no_import_circles():
    circles = sorted({" ↔ ".join(sorted((name, other))) for name in modules() for other in reachable_from(name)
                      if other != name and name in reachable_from(other)})
    assert not circles, f"modules that import each other (directly or not): {circles}"


def test_the_api_sees_the_engine_only_through_its_client_surface():
    """api/ never touches the object the engine thread owns: a remote engine pool can stand in."""
    serving = ("mistral_serve.api", "mistral_serve.catalog")  # the catalog is what the API serves
    reaching_in = {f"{name} imports {imported}" for name in modules() if name.startswith(serving)
                   for imported in imports_of(name)
                   if imported.startswith("mistral_serve.engine") and imported not in ENGINE_SURFACE}
    assert not reaching_in, sorted(reaching_in)


def test_the_runner_imports_nothing_that_rewrites_the_model():
    assert "mistral_serve.engine.runner" in modules()
    rewriters = reachable_from("mistral_serve.engine.runner") & MODEL_REWRITERS
    assert not rewriters, f"the runner reaches {sorted(rewriters)}"


def test_engine_and_model_know_nothing_of_http_or_the_database():
    for name in modules():
        if name.startswith(("mistral_serve.engine", "mistral_serve.model")):
            assert not {imported for imported in imports_of(name)
                        if imported.startswith(("mistral_serve.api", "mistral_serve.db"))}, name
            source = modules()[name].read_text()
            assert "import fastapi" not in source and "from fastapi" not in source, name
            assert "sqlalchemy" not in source, name
