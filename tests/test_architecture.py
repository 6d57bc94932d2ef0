"""The package's import graph keeps its layers: no cycle, and no import that reaches up a layer (issue 19, section 7).

The graph is read from the source with ``ast``: every ``import`` of a genai_cli module, at module level or inside a
function (a function-level import still ties the two modules together; it only hides the knot until run time).
Imports under ``if TYPE_CHECKING:`` are left out: they never run. ``python tests/test_architecture.py`` prints the
counts and each cycle and upward import (``python tests/test_architecture.py CHECKOUT``: another checkout's).

It also walks a parent reference (issue 19's measure): MaskGIT's ``model.tokenizer: RUN`` traced from the call the
run's assembly makes (``build_model``) to the frozen VQ-VAE handed to the family, counting the files entered
(``parent_walk``; docs/ARCHITECTURE.md, "A run that builds on another", gives the walk file by file).
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


# -- the walk of a parent reference -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    depth: int
    file: str  # relative to genai_cli/
    name: str


def trace_calls(fn) -> list[Call]:
    """Every call of a genai_cli function while ``fn()`` runs, depth first (``sys.settrace``)."""
    import sys

    calls: list[Call] = []
    depth = 0
    root = str(PACKAGE) + "/"

    def on_call(frame, event, arg):
        nonlocal depth
        if event != "call" or not frame.f_code.co_filename.startswith(root):
            return None
        calls.append(Call(depth, frame.f_code.co_filename[len(root):], frame.f_code.co_name))
        depth += 1

        def on_return(frame, event, arg):
            nonlocal depth
            if event == "return":
                depth -= 1
            return on_return

        return on_return

    sys.settrace(on_call)
    try:
        fn()
    finally:
        sys.settrace(None)
    return calls


def parent_walk(runs: Path) -> list[Call]:
    """The calls from ``build_model`` (as a new run's assembly calls it) to the frozen tokenizer handed to MaskGIT, for
    a tiny MaskGIT whose ``model.tokenizer`` names a tiny VQ-VAE run under ``runs``. Left out: the building of the two
    networks themselves (nn/, the child's build_network), the Parents built last, and comprehensions."""
    from helpers import SPEC, tiny_cfg, untrained_parent

    from genai_cli.build import build_model
    from genai_cli.runs import save_checkpoint
    from genai_cli.spec import spec_to_dict

    parent = untrained_parent("vqvae", SPEC)
    save_checkpoint({"family": "vqvae", "config": parent.config, "spec": spec_to_dict(SPEC), "model": parent.weights,
                     "step": 0, "parents": {}}, runs / "tok" / "checkpoints" / "last.pt")
    cfg = tiny_cfg("maskgit", tokenizer="tok")  # the config's model: section, read before the run is assembled
    calls = trace_calls(lambda: build_model("maskgit", cfg, SPEC, root=runs))
    walk, skip_below = [], None
    for call in calls:
        if skip_below is not None and call.depth > skip_below:
            continue
        skip_below = None
        if call.file.startswith("nn/") or call.name.startswith("<") or call.name == "build_network":
            skip_below = call.depth
            continue
        if call.depth == 1 and call.file == "lineage.py" and call.name == "__init__":  # Parents(...): handed over
            break
        walk.append(call)
    return walk


def walk_counts(walk: list[Call]) -> dict[str, list[str] | int]:
    """Files entered: every file a call of the walk runs in (``all_files``, with train.py, where it starts), and those
    a reader must open to follow it (``files``): where a call hands the walk on to another file; a call that reaches no
    other file is a look-up whose name says what it gives (registry.get, spec_from_dict, runs.load_checkpoint_file...).
    ``climbs``: the calls into such a file, each of which the reader returns from to go on where it was called."""
    def caller(i: int) -> Call:
        return next((walk[j] for j in range(i - 1, -1, -1) if walk[j].depth < walk[i].depth),
                    Call(-1, "train.py", "assemble"))

    hands_on = set()
    for i in range(len(walk)):  # a call hands on if a call below it (before the next at its depth) is in another file
        for j in range(i + 1, len(walk)):
            if walk[j].depth <= walk[i].depth:
                break
            if walk[j].file != walk[i].file:
                hands_on.add(i)
                break
    files, climbs = ["train.py"], 0
    for i in sorted(hands_on):
        files += [walk[i].file] if walk[i].file not in files else []
        climbs += caller(i).file != walk[i].file
    all_files = list(dict.fromkeys(["train.py", *(c.file for c in walk)]))
    return {"files": files, "climbs": climbs, "all_files": all_files}


def walk_report(runs: Path) -> str:
    walk = parent_walk(runs)
    counts = walk_counts(walk)
    files = counts["files"]
    lines = [f"the walk of model.tokenizer: {len(files)} files a reader enters ({', '.join(files)}), "
             f"{counts['climbs']} climbs back up; {len(counts['all_files'])} files any call runs in"]
    return "\n".join(lines + [f"  {'  ' * c.depth}{c.file}:{c.name}" for c in walk])


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
    if len(sys.argv) == 1:
        import tempfile

        sys.path.insert(0, str(Path(__file__).parent))
        with tempfile.TemporaryDirectory() as folder:
            print(walk_report(Path(folder)))


def test_a_parent_reference_is_followed_through_five_files(tmp_path):
    """From the run's assembly to the frozen parent: build.py asks lineage.py to read and check the run, builds the
    parent's family (models/vqvae.py, on models/base.py) and has lineage.py freeze it; nothing more to open."""
    counts = walk_counts(parent_walk(tmp_path))
    assert counts["files"] == ["train.py", "build.py", "lineage.py", "models/vqvae.py", "models/base.py"], \
        walk_report(tmp_path)
    assert counts["climbs"] <= 5, walk_report(tmp_path)
