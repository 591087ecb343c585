"""A leading underscore means "this module's own": no module of the package or of bench/ imports
another module's underscored name (make it public, or move it where it is used)."""

from __future__ import annotations

import ast
from pathlib import Path

import phrasefuse

ROOT = Path(phrasefuse.__file__).parent.parent


def test_no_private_name_is_imported_across_modules():
    offences = []
    for path in sorted([*(ROOT / "phrasefuse").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("phrasefuse"):
                offences += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offences, "private names imported across modules:\n" + "\n".join(offences)
