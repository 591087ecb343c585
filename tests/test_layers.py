"""The package's layers: no import cycle between phrasefuse's top-level modules and subpackages.

The imports are read from the source (ast), including those inside functions, which Python
resolves late but which still tie two modules together. Each unit may import only units in
a layer below it (or its own layer when the two do not import each other); a new arrow that
points up, or closes a cycle, fails with the file and line that adds it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import phrasefuse

PACKAGE = Path(phrasefuse.__file__).parent

# Bottom to top. A unit imports only units of lower layers (or of its own layer, without a cycle).
LAYERS = [
    ["errors", "__init__", "faultpoints"],  # `phrasefuse/__init__.py`: the version (store records it); the test-only fault hook
    ["folders"],  # atomic files and folder swaps, leftover recovery, meta.json: used by stores, indexes, heads
    ["store", "folder_report"],  # the embedding store; the report type `inspect` prints
    ["manifests", "engine"],  # reading tables; how a batch job runs (local or Ray)
    ["extract"],  # encoders and the extract jobs
    ["index"],  # pairs, prototypes, the FAISS index, phrases (uses extract's encoders)
    ["fuse", "synthetic", "interop"],  # heads on cached embeddings; generated data; other tools' files
    ["inspect", "report"],  # describe any folder; the run's HTML report
    ["run"],  # a whole config, stage by stage
    ["demo"],
    ["cli"],
    ["__main__"],
]

# Edges inside a unit are checked for `fuse` only (below): its command modules, which nothing
# else in fuse imports, over library modules without a cycle.
FUSE_COMMANDS = ["train", "ablate", "evaluate"]  # `fuse train`, `fuse ablate`, `fuse eval` / `predict` / `zeroshot`


def _unit_of(module: str) -> str:
    """phrasefuse.index.folder -> index; phrasefuse -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> tuple[str, str]:
    """(module, package its relative imports start from)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imported(node: ast.AST, package: str) -> list[str]:
    """The phrasefuse modules an import statement loads (`from a import b`: a.b when b is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    return [source] + [f"{source}.{a.name}" for a in node.names if _is_module(f"{source}.{a.name}")]


def import_edges() -> dict[tuple[str, str], list[str]]:
    """(unit, unit it imports) -> where ('path:line'), for every import in the package."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        module, package = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported(node, package):
                if target == "phrasefuse" or target.startswith("phrasefuse."):
                    a, b = _unit_of(module), _unit_of(target)
                    if a != b:
                        edges[a, b].append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return edges


def cycles(edges) -> list[list[str]]:
    """Each strongly connected set of units with more than one member (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_imports_inside_functions():
    edges = import_edges()
    # cli imports the jobs inside its command functions only (keeps --help instant).
    assert any("phrasefuse/cli.py" in where for where in edges["cli", "extract"])
    assert ("extract", "engine") in edges and ("index", "engine") in edges


def test_no_import_cycle_between_units():
    edges = import_edges()
    found = cycles(edges)
    assert not found, "import cycles: " + "; ".join(
        " <-> ".join(group) + " (" + ", ".join(f"{a}->{b} at {edges[a, b][0]}" for a in group for b in group
                                         if (a, b) in edges) + ")" for group in found)


def test_every_import_points_down_the_layers():
    layer = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    units = {_unit_of(_module_name(p)[0]) for p in PACKAGE.rglob("*.py")}
    assert units <= set(layer), f"units missing from LAYERS: {sorted(units - set(layer))}"
    upward = [f"{a} -> {b} ({', '.join(where)})" for (a, b), where in sorted(import_edges().items())
              if layer[b] > layer[a]]
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def module_edges(unit: str) -> dict[tuple[str, str], list[str]]:
    """(module, module it imports) -> where, for the imports between modules of one unit."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    prefix = f"phrasefuse.{unit}."
    for path in sorted((PACKAGE / unit).rglob("*.py")):
        module, package = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported(node, package):
                if target.startswith(prefix) and _is_module(target) and target != module:
                    where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                    edges[module.removeprefix(prefix), target.removeprefix(prefix)].append(where)
    return edges


def test_fuse_library_modules_import_no_command_and_no_cycle():
    edges = module_edges("fuse")
    assert ("ablate", "select") in edges and ("heads.torch_heads", "heads.base") in edges  # the scan sees them
    into_commands = [f"{a} -> {b} ({', '.join(where)})" for (a, b), where in sorted(edges.items())
                     if b in FUSE_COMMANDS]
    assert not into_commands, "fuse modules importing a command module:\n" + "\n".join(into_commands)
    found = cycles(edges)
    assert not found, "import cycles inside fuse: " + "; ".join(" <-> ".join(group) for group in found)


MAX_FUNCTION_LINES = 60  # a longer function is split into named steps (issue 15)


def long_functions(root: Path = PACKAGE, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function or method of the package longer than `limit` lines (decorators excluded)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_the_length_scan_sees_a_long_function(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n" + "    x = 1\n" * 61, encoding="utf-8")
    assert long_functions(tmp_path) == [f"{tmp_path.name}/m.py:1 f (62 lines)"]


def test_no_function_over_60_lines():
    assert long_functions() == []
