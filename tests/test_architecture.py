"""The package's import graph keeps its layers: no cycle, and no import that reaches up a layer (issue 19, section 7).

The graph is read from the source with ``ast``: every ``import`` of a genai_cli module, at module level or inside a
function (a function-level import still ties the two modules together; it only hides the knot until run time).
Imports under ``if TYPE_CHECKING:`` are left out: they never run. ``python tests/test_architecture.py`` prints the
counts and each cycle and upward import (``python tests/test_architecture.py CHECKOUT``: another checkout's).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "genai_cli"

# Lower layers never import higher ones. A module imports its own layer or those below.
LAYERS: list[tuple[str, ...]] = [
    # plain Python, no torch; "" is the package root: __version__, and the API names it loads lazily, by name
    ("errors", "spec", "options", "capabilities", "config", "registry", ""),
    ("hardware", "sampling", "distributed", "nn"),  # torch, no knowledge of runs or families
    ("lineage", "runs", "data", "streaming", "build"),  # runs on disk, datasets (streamed ones too), building a model
    ("models",),  # one family per file
    ("generate", "export", "api", "train", "session", "evaluation", "compare"),  # what the commands do
    ("cli", "__main__"),  # the command line
]


def layer_of(module: str) -> int:
    """genai_cli.models.vae -> 3: the layer of the first name under genai_cli."""
    head = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    in_function: bool


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (never executed)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return skip


def edges() -> list[Edge]:
    known = modules()
    found = []
    for module, path in known.items():
        found += module_edges(module, path, known)
    return found


def module_edges(module: str, path: Path, known: dict[str, Path]) -> list[Edge]:
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if id(child) not in skip and isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend(Edge(module, target, child.lineno, in_function)
                             for target in targets(child, package, known) if target != module)
            visit(child, nested)

    visit(tree, False)
    return found


def targets(node: ast.Import | ast.ImportFrom, package: str, known: dict[str, Path]) -> list[str]:
    """The genai_cli modules an import statement runs: ``from .models import vae`` -> genai_cli.models.vae;
    ``from .models import MODELS`` -> genai_cli.models (its __init__). Parent packages imported on the way are
    not counted: importing genai_cli.x always runs genai_cli/__init__.py, which imports nothing eagerly."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if node.level:
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if not source.startswith("genai_cli"):
        return []
    out = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in known:
            out.append(sub)
        elif source in known:
            out.append(source)
    return sorted(set(out))


def cycles(graph_edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm): each is a set of modules
    that import each other, directly or around a circle."""
    graph: dict[str, set[str]] = {}
    for e in graph_edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(components, key=len, reverse=True)


def upward(graph_edges: list[Edge]) -> list[Edge]:
    return [e for e in graph_edges if layer_of(e.target) > layer_of(e.source)]


def report() -> str:
    graph_edges = edges()
    found, up = cycles(graph_edges), upward(graph_edges)
    lines = [f"{len(modules())} modules, {len(graph_edges)} import edges "
             f"({sum(e.in_function for e in graph_edges)} inside functions)",
             f"cycles: {len(found)}" + (f" (sizes {', '.join(str(len(c)) for c in found)})" if found else ""),
             f"upward imports: {len(up)} ({sum(e.in_function for e in up)} inside functions)"]
    lines += [f"  cycle: {' '.join(c)}" for c in found]
    lines += [f"  up: {e.source}:{e.line} -> {e.target}{' (in a function)' if e.in_function else ''}" for e in up]
    return "\n".join(lines)


# -- the tests ----------------------------------------------------------------------------------------------------
def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_the_graph_reader_sees_function_level_and_relative_imports():
    known = {"genai_cli.models": Path(), "genai_cli.models.vae": Path(), "genai_cli.runs": Path()}
    tree = ast.parse("def f():\n    from ..runs import save_grid\n    from . import vae\n    from . import MODELS\n")
    found = [t for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             for t in targets(node, "genai_cli.models", known)]
    assert found == ["genai_cli.runs", "genai_cli.models.vae", "genai_cli.models"]
    assert cycles([Edge("a", "b", 1, False), Edge("b", "c", 1, True), Edge("c", "a", 1, False),
                   Edge("c", "d", 1, False)]) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert not cycles(edges()), report()


def test_no_function_level_import_goes_up_a_layer():
    """A function-level import that reaches up is how a cycle hides; each one is a dependency turned upside down."""
    assert not [e for e in upward(edges()) if e.in_function], report()


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1:  # another checkout's package, e.g. an older commit unpacked with git archive
        PACKAGE = Path(sys.argv[1]).resolve() / "genai_cli"
    print(report())
