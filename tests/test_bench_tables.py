"""docs/benchmarks.md's tables are generated: they equal what bench/tables.py renders from the
committed result files, each of which records its command, date and machine; bench/real.py
writes that format."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def bench_module(name: str) -> ModuleType:
    """A bench/ script as a module (bench/ is not a package: its scripts are run by path)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_tables_equal_what_the_result_files_render() -> None:
    tables = bench_module("tables")
    text = tables.DOC.read_text(encoding="utf-8")
    names = [m.group("name") for m in tables.BLOCK.finditer(text)]
    assert names, "docs/benchmarks.md has no generated tables"
    assert tables.rendered(text) == text, "docs/benchmarks.md differs from bench/results/: run bench/tables.py"
    committed = {p.stem for p in tables.RESULTS.glob("*.json")}
    assert committed <= set(names), f"result files no table shows: {sorted(committed - set(names))}"


def test_every_result_file_records_its_command_date_and_machine() -> None:
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        for key in ("title", "command", "date", "machine", "columns", "rows"):
            assert result.get(key), f"{path.name}: no {key}"
        assert "../" not in result["command"], f"{path.name}: a command with a path outside the repository"


def test_real_py_writes_the_result_format() -> None:
    """bench/real.py's result file from a made-up ablation renders like the committed one."""
    real, tables = bench_module("real"), bench_module("tables")
    table = {"shots": 1, "rows": [
        {"features": "image (image only)", "top1": {"mean": 0.356, "std": 0.045}},
        {"features": "image + label prior (phrases)", "top1": {"mean": 0.4, "std": 0.052},
         "gain": {"mean": 0.044, "std": 0.023}, "prior_weights": [10.0, 0.0], "prior_chosen_by": "1 shot"}]}
    results = {"linear": {"tables": [table], "test_rows": 2000}}
    zeroshot = {"metrics": {"top1": 0.382}, "chance_top1": 0.1}
    result = real.result_file(results, zeroshot, 2, "bench/real.py --work W", 60.0, "2026-12-01", "2 cores")
    assert result["columns"] == json.loads((ROOT / "bench/results/real-cifar10.json").read_text())["columns"]
    lines = [line for line in tables.render(result).splitlines() if line.startswith("| 1-shot")]
    assert lines[-2] == "| 1-shot | linear | image | 35.6 ± 4.5 |  |  |"
    assert lines[-1] == "| 1-shot | linear | image + label prior | 40.0 ± 5.2 | +4.4 ± 2.3 | prior used 1/2 (weights 10, 0; 1 shot) |"
