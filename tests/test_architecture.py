"""The import rule of docs/architecture.md, checked on the source with ``ast``.

Every module of ``dcdit_cli`` belongs to one layer (its subpackage); a module imports only from
its own layer and those below it, the module graph has no cycles, and library modules import at
the top of the file except for the optional dependencies allowed below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dcdit_cli"

# Bottom to top, as in docs/architecture.md ("The import rule").
LAYERS = ["common", "config", "models", "diffusion", "pipelines", "data", "training", "sampling", "evaluation", "hub", "cli"]
CLI_MODULES = {"dcdit_cli.cli", "dcdit_cli.__main__", "dcdit_cli.errors"}

# Library imports that may stay inside a function, each with its reason (docs/architecture.md).
FUNCTION_LEVEL_ALLOWED = {
    ("dcdit_cli.models.attention", "torch.nn.attention.varlen"): "optional: only some torch builds have it",
    ("dcdit_cli.models.attention", "torch.nn.attention"): "optional: only some torch builds have varlen",
    ("dcdit_cli.models.attention", "flash_attn"): "optional dependency (pip install dcdit[flash])",
    ("dcdit_cli.common.host_memory", "torch"): "use_huge_pages must run before torch is imported",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    """The layer of a module: its subpackage, the CLI for the top-level modules."""
    if module in CLI_MODULES:
        return LAYERS.index("cli")
    if module == "dcdit_cli":  # __init__: the version only
        return 0
    return LAYERS.index(module.split(".")[1])


def resolve(name: str) -> str | None:
    """The dcdit module an imported name lives in (``dcdit_cli.models.build_model`` → ``dcdit_cli.models``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_in(source: str, package: str) -> list[tuple[str, bool]]:
    """(imported name, inside a function?) for every import statement of ``source``; relative
    imports are resolved against ``package``."""
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - child.level + 1] + ([child.module] if child.module else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    found.append((full if full in MODULES else base, in_function))
            visit(child, inside)

    visit(ast.parse(source), False)
    return found


def imports(module: str) -> list[tuple[str, bool]]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return imports_in(path.read_text(encoding="utf-8"), package)


def internal_edges() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m in MODULES:
        for name, _ in imports(m):
            target = resolve(name) if name.split(".")[0] == "dcdit_cli" else None
            if target and target != m:
                graph[m].add(target)
    return graph


def test_every_module_has_a_layer():
    for m in MODULES:
        assert 0 <= layer(m) < len(LAYERS), m


def test_no_upward_imports():
    upward = [f"{m} (layer {LAYERS[layer(m)]}) imports {t} (layer {LAYERS[layer(t)]})"
              for m, targets in internal_edges().items() for t in sorted(targets) if layer(t) > layer(m)]
    assert upward == []


def test_no_import_cycles():
    graph = internal_edges()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [m])
    assert cycles == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in CLI_MODULES))
def test_library_imports_at_the_top(module):
    inner = sorted({name for name, in_function in imports(module) if in_function} - {
        name for (m, name) in FUNCTION_LEVEL_ALLOWED if m == module})
    assert inner == [], f"{module} imports inside functions: {inner} (move them to the top, or allow them with a reason)"


def test_the_checker_sees_function_level_and_relative_imports():
    source = (
        "import os\n"
        "from .console import DcditError\n"
        "def f():\n"
        "    import json\n"
        "    from dcdit_cli.models import build_model\n"
        "    return lambda: __import__('x')\n"
        "class C:\n"
        "    def g(self):\n"
        "        from dcdit_cli.common import atomic\n"
    )
    assert imports_in(source, "dcdit_cli.common") == [
        ("os", False), ("dcdit_cli.common.console", False), ("json", True), ("dcdit_cli.models", True),
        ("dcdit_cli.common.atomic", True),
    ]


def test_the_layer_list_matches_the_doc():
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    rule = " < ".join(f"{name} ({i})" for i, name in enumerate(LAYERS))
    assert rule in doc, f"docs/architecture.md must state the layer order: {rule}"
    for path in MODULES.values():
        if path.name != "__init__.py":
            assert f"`{path.name}`" in doc, f"docs/architecture.md's module map lacks {path.relative_to(PACKAGE)}"
