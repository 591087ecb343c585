"""Index kinds and encoder families are registries: outside the module that registers them, code
asks the record (`KINDS[name]`, `family_of(name)`), never compares a name. Read from the source (ast):
a comparison with a registered name (`kind == "flat"`, `family in ("open_clip", "timm")`), a prefix
test of one (`kind.startswith("ivf")`) or a table keyed by several of them fails with file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import phrasefuse
from phrasefuse.extract.encoders import FAMILIES
from phrasefuse.index.kinds import KINDS

ROOT = Path(phrasefuse.__file__).parent.parent
SOURCES = sorted([*(ROOT / "phrasefuse").rglob("*.py"), *(ROOT / "bench").rglob("*.py")])
# A registry's files. An encoder family's record has a torch-free half, the rule naming its weights
# files (`extract/identity.py` FILES_OF_FAMILY: a run with nothing to do names its encoder without
# importing torch); tests/extract/test_noop.py checks its keys are registered families.
REGISTRIES = {"index kind": (set(KINDS), ("phrasefuse/index/kinds.py",)),
              "encoder family": (set(FAMILIES), ("phrasefuse/extract/encoders.py", "phrasefuse/extract/identity.py"))}


def _strings(node: ast.AST) -> list[str]:
    """The string constants of an operand: itself, or the elements of a tuple, list or set."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [n.value for n in items if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def name_tests(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each place `tree` tells registered names apart by spelling."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            found += [(node.lineno, s) for op in (node.left, *node.comparators) for s in _strings(op) if s in names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith") and node.args):
            found += [(node.lineno, s) for s in _strings(node.args[0])
                      if len(s) >= 3 and any(n.startswith(s) or n.endswith(s) for n in names)]
        elif isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in names]
            if len(keys) >= 2:
                found.append((node.lineno, ", ".join(keys)))
    return found


@pytest.mark.parametrize("what", list(REGISTRIES))
def test_no_module_outside_the_registry_compares_names(what):
    names, registry = REGISTRIES[what]
    offences = [f"{path.relative_to(ROOT)}:{line}: {name!r}"
                for path in SOURCES if path.relative_to(ROOT).as_posix() not in registry
                for line, name in name_tests(ast.parse(path.read_text(), str(path)), names)]
    assert not offences, (f"{what} names compared outside {', '.join(registry)} (ask the record instead):\n"
                          + "\n".join(offences))


def test_the_check_sees_the_old_spellings():
    old = '''
if kind == "flat": pass
if family != "open_clip": pass
if family in ("open_clip", "timm"): pass
if plan.kind.startswith("ivf"): pass
param = {"flat": None, "hnsw": "efSearch"}.get(kind, "nprobe")
'''
    tree = ast.parse(old)
    assert [line for line, _ in name_tests(tree, set(KINDS))] == [2, 5, 6]
    assert [line for line, _ in name_tests(tree, set(FAMILIES))] == [3, 4, 4]
