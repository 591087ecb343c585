"""Render the Markdown tables of docs/benchmarks.md from the committed result files in bench/results/.

Each result file is one JSON document:

    {"title": ..., "command": ..., "date": "YYYY-MM-DD", "machine": ..., "data": ..., "notes": ...,
     "figures": {...},                      # single figures quoted in the text (optional)
     "columns": [[header, template], ...],  # template: a str.format template over a row's fields
     "rows": [{field: value, ...}, ...]}

A cell whose template names a field that is null (or absent) is left empty (e.g. the gain of the
image-only row). In docs/benchmarks.md a table sits between two marker comments:

    <!-- results: real-cifar10 -->
    ...generated...
    <!-- /results -->

    .venv/bin/python bench/tables.py           # rewrite the generated parts of docs/benchmarks.md
    .venv/bin/python bench/tables.py --check   # exit 1 when they differ from what the results give

tests/test_bench_tables.py runs the check, so a hand-edited table fails the suite.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def cell(template: str, row: dict) -> str:
    """One cell: the template over the row, or empty when a field it names has no value."""
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    if any(row.get(f) is None for f in fields):
        return ""
    # A "|" inside a cell would split the Markdown row.
    return template.format(**row).replace("|", "\\|")


def render(result: dict) -> str:
    """The Markdown of one result file: provenance line, then the table."""
    headers = [h for h, _ in result["columns"]]
    lines = [f"_{result['title']}. Command: `{result['command']}`; machine: {result['machine']}; "
             f"date: {result['date']}._", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in result["rows"]:
        lines.append("| " + " | ".join(cell(t, row) for _, t in result["columns"]) + " |")
    for key in ("data", "notes"):  # what was measured on, and how to read it
        if result.get(key):
            lines += ["", f"{key.capitalize()}: {result[key]}"]
    return "\n".join(lines) + "\n"


def load(name: str, results: Path = RESULTS) -> dict:
    return json.loads((results / f"{name}.json").read_text(encoding="utf-8"))


def rendered(text: str, results: Path = RESULTS) -> str:
    """`text` with every marked block replaced by its table as the result files give it."""
    return BLOCK.sub(lambda m: m.group(1) + render(load(m.group("name"), results)) + m.group(4), text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="Only compare; exit 1 when the document differs.")
    ap.add_argument("--doc", type=Path, default=DOC)
    args = ap.parse_args()
    text = args.doc.read_text(encoding="utf-8")
    new = rendered(text)
    if args.check:
        if new != text:
            print(f"{args.doc}: tables differ from bench/results/; run bench/tables.py", file=sys.stderr)
            return 1
        return 0
    args.doc.write_text(new, encoding="utf-8")
    print(f"{args.doc}: {len(BLOCK.findall(text))} tables rendered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
