"""The package's import graph has no cycle, counting the imports written inside functions too (a cycle hidden
in a function is still one: neither module can be understood, tested or moved without the other)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "barkbench"


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, anywhere in its file (dotted names below the
    package: `sub.mod`)."""
    name = package.name
    modules = {".".join(p.relative_to(package).with_suffix("").parts): p for p in package.rglob("*.py")}
    modules = {m.removesuffix(".__init__") if m != "__init__" else "": p for m, p in modules.items()}
    graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        here = module.split(".") if module else []
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here if is_package else here[:-1]
                    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                    prefix = ".".join([name, *base, *([node.module] if node.module else [])])
                else:
                    prefix = node.module or ""
                targets = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target == name or target.startswith(name + "."):
                    inner = target[len(name) + 1:]
                    if inner in modules and inner != module:
                        found.add(inner)
        graph[module] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert {"models", "legacy", "runner", "cli"} <= set(graph)  # the walk found the package's modules
    assert "legacy" in graph["models"]  # and their imports
    assert cycles(graph) == []


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from .sub.c import g\n")
    (package / "sub" / "c.py").write_text("def g():\n    import pkg.a\n")
    (package / "d.py").write_text("from .a import x\n")
    assert cycles(import_graph(package)) == [["a", "b", "sub.c"]]
