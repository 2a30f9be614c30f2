"""The package layout: data flows one way (tracing never imports editing), no import circles, and hook names
come only from the adapter."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``"""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and [getattr(c, "value", None) for c in test.comparators] == ["__main__"])


def _nodes(tree: ast.AST):
    """Every node of ``tree`` outside ``if __name__ == "__main__":`` blocks: a module run as a script (e.g.
    ``python -m editing.evaluate`` handing over to its command module) is not imported by anything."""
    for child in ast.iter_child_nodes(tree):
        if not _is_main_guard(child):
            yield child
            yield from _nodes(child)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at the top or inside functions; not in a ``__main__`` block)."""
    modules = {}
    for package in ("tracing", "editing", "figures"):
        for file in (ROOT / package).rglob("*.py"):
            modules[".".join(file.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = file
    graph = {}
    for name, file in modules.items():
        imported = set()
        for node in _nodes(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported |= {m for m in (node.module, *(f"{node.module}.{a.name}" for a in node.names)) if m in modules}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name in modules}
        graph[name] = imported - {name}
    return graph


def test_tracing_never_imports_editing_or_figures():
    offenders = {m: sorted(i for i in imports if not i.startswith("tracing"))
                 for m, imports in import_graph().items() if m.startswith("tracing")}
    assert {m: i for m, i in offenders.items() if i} == {}


def test_no_import_circles():
    graph = import_graph()
    state: dict[str, int] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                circles.append(path[path.index(other):] + [other])
            elif other not in state:
                visit(other, path + [other])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_hook_names_come_only_from_the_adapter():
    literal = re.compile(r"""["'](blocks\.\d|blocks\.\{|hook_embed|ln_final\.|hook_resid|hook_mlp_out|hook_attn_out)""")
    offenders = [f"{file.relative_to(ROOT)}:{n}" for package in ("tracing", "editing", "figures", "benchmarks")
                 for file in (ROOT / package).rglob("*.py") if file.name != "adapter.py"
                 for n, line in enumerate(file.read_text().splitlines(), 1) if literal.search(line)]
    assert offenders == []
