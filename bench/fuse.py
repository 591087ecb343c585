"""Benchmark: how long each head takes to (re-)train on cached embeddings (not a test).

Writes real embedding stores of random-but-learnable features (default: 50,000 rows,
1,280-dim image + two 384-dim text features, 100 classes; class centroids plus noise,
30% of one text feature missing), then runs `fuse train` for each head and prints its
wall-clock seconds (store reading, text-trust tuning, the image-only baseline and
saving included) and its test top-1 beside image-only.

    .venv/bin/python bench/fuse.py                      # the setting of docs/benchmarks.md
    .venv/bin/python bench/fuse.py --rows 5000 --heads linear mlp
    .venv/bin/python bench/fuse.py --results bench/results/fuse.json   # then bench/tables.py

--results PATH writes the figures as a result file (bench/tables.py's format: command, date, machine,
one row per head), from which docs/benchmarks.md's table is rendered.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phrasefuse.store import StoreWriter, new_meta  # noqa: E402


def write_features(folder: Path, rows: int, classes: int, dims: tuple[int, ...], signals: tuple[float, ...],
                   missing: tuple[float, ...], seed: int) -> tuple[Path, list[Path]]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, rows)
    ids = np.array([f"r{i:07d}" for i in range(rows)], dtype=object)
    split = np.where(np.arange(rows) % 10 < 8, "train", np.where(np.arange(rows) % 10 < 9, "val", "test"))
    pq.write_table(pa.table({"id": ids.tolist(), "label": [f"class-{c:03d}" for c in y], "split": split.tolist()}),
                   folder / "manifest.parquet")
    stores = []
    for k, (dim, signal, miss) in enumerate(zip(dims, signals, missing)):
        name = "img" if k == 0 else f"text{k}"
        centroids = rng.standard_normal((classes, dim)).astype(np.float32)
        x = signal * centroids[y] + rng.standard_normal((rows, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        keep = rng.random(rows) >= miss
        encoder = {"spec": f"bench:{name}", "family": "bench", "name": name, "weights_sha256": f"{k:064d}", "dim": dim}
        meta = new_meta(modality="image" if k == 0 else "text", encoder=encoder, dtype="float32",
                        source={"manifest": "bench", "column": name})
        with StoreWriter.open(folder / name, meta, shard_size=10_000) as w:
            w.add(ids[keep], ids[keep], x[keep])
        stores.append(folder / name)
    return folder / "manifest.parquet", stores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--heads", nargs="+", default=["linear", "mlp", "lgbm"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="Keep the stores here (default: a temporary folder).")
    ap.add_argument("--results", type=Path, default=None, help="Also write the figures as a result file (JSON).")
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d", time.gmtime())
    rows: list[dict] = []
    from phrasefuse.fuse.train import train_head

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.work or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        manifest, stores = write_features(folder, args.rows, args.classes, (1280, 384, 384), (0.11, 0.13, 0.08),
                                          (0.0, 0.3, 0.0), args.seed)
        print(f"features: {args.rows} rows, 1280 + 384 + 384 dims, {args.classes} classes, {os.cpu_count()} cores "
              f"(written in {time.perf_counter() - t:.1f} s)")
        for kind in args.heads:
            t = time.perf_counter()
            report = train_head(manifest, [str(s) for s in stores], folder / f"head-{kind}", kind=kind, seed=args.seed)
            seconds = time.perf_counter() - t
            test = report.metrics["test"]
            fused = test.get("fused", test["saved"])["top1"]
            image = test.get("image_only", test["saved"])["top1"]
            print(f"{kind:<7} {seconds:7.1f} s   test top-1: saved {100 * test['saved']['top1']:.1f} "
                  f"(fused {100 * fused:.1f}, image-only {100 * image:.1f}; saved {report.saved})", flush=True)
            rows.append({"head": kind, "seconds": round(seconds, 1), "fused_top1": round(100 * fused, 2),
                         "image_top1": round(100 * image, 2)})
    if args.results:
        args.results.write_text(json.dumps(result_file(args, rows, started), indent=1) + "\n", encoding="utf-8")
        print(f"results: {args.results}")


def result_file(args: argparse.Namespace, rows: list[dict], started: str) -> dict:
    """The figures in bench/tables.py's format, with what they depend on (cores, load)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"title": "Re-training cost of the heads",
            "command": ".venv/bin/python bench/fuse.py " + " ".join(sys.argv[1:]),
            "date": started,
            "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()}), load average "
                       f"{load:.1f} at the end",
            "data": f"{args.rows:,} rows of 1,280 + 384 + 384 random-but-learnable features, {args.classes} classes, "
                    f"one text feature 30% missing",
            "notes": "Store reading, text-trust tuning, the image-only baseline and saving included.",
            "columns": [["head", "{head}"], ["seconds", "{seconds:.1f}"], ["test top-1, fused", "{fused_top1:.1f}"],
                        ["test top-1, image only", "{image_top1:.1f}"]],
            "rows": rows}


if __name__ == "__main__":
    main()
