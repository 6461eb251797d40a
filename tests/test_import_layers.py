"""fastvlm's modules import one way.

Every ``import`` / ``from ... import`` in the package, function bodies included (an
import hidden in a function still ties the two modules together), makes an edge of
the module graph. The graph has no cycle, and no module of a lower layer imports a
higher one: ``ops``, ``kernels``, ``nn``, ``models``, ``data``, ``utils`` are the
library below ``train``, ``integrations`` and ``cli``; ``kernels`` (Triton code)
imports nothing of the ops that launch it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastvlm"
LOWER = ("ops", "kernels", "nn", "models", "data", "utils")
HIGHER = ("train", "integrations", "cli")


def module_graph(package: Path) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports (anywhere in its file)."""
    root = package.parent
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    # compiled extensions (fastvlm._C) are modules too, importing nothing of the package;
    # _C is named here since a checkout need not have built it
    extensions = {f"{package.name}._C"} | {".".join(p.relative_to(root).parts[:-1] + (p.name.split(".")[0],))
                                         for p in package.rglob("*.so")}
    top = package.name
    graph = {name: set() for name in extensions}
    for name, path in modules.items():
        own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = own_package.split(".")[:len(own_package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports the submodule when there is one, else pkg itself
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules.keys() | extensions else base
                             for a in node.names)
        graph[name] = {m for m in found if m in graph.keys() | modules.keys() and m != name and m.split(".")[0] == top}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, imported in graph.items():
        for other in imported:
            if layer(name) in LOWER and layer(other) in HIGHER:
                bad.append(f"{name} -> {other}")
            elif layer(name) == "kernels" and layer(other) in ("ops", "nn", "models", "data"):
                bad.append(f"{name} -> {other}")
    return sorted(bad)


def test_no_import_cycle_among_fastvlm_modules():
    graph = module_graph(PACKAGE)
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the parse found the package
    assert cycles(graph) == []


def test_lower_layers_never_import_higher_ones():
    assert upward(module_graph(PACKAGE)) == []


@pytest.fixture
def toy_package(tmp_path):
    """A package with a cycle hidden in a function body and an upward import."""
    pkg = tmp_path / "fastvlm"
    for folder in ("", "train", "models"):
        (pkg / folder).mkdir(exist_ok=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "train" / "a.py").write_text("from fastvlm.train import b\n")
    (pkg / "train" / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    (pkg / "models" / "m.py").write_text("import fastvlm.train.b\n")
    return pkg


def test_the_checks_find_a_cycle_in_a_function_body_and_an_upward_import(toy_package):
    graph = module_graph(toy_package)
    assert cycles(graph) == [["fastvlm.train.a", "fastvlm.train.b"]]
    assert upward(graph) == ["fastvlm.models.m -> fastvlm.train.b"]
