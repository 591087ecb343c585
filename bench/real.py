"""Benchmark: quality on real images, through the CLI contract (not a test).

Target CIFAR-10 (train / val / test split), query corpus Tiny ImageNet with WordNet synonyms as
queries: the `realdev` folder (cifar10/, tinyimagenet/), read from `../shared/data/realdev` beside the
repository when present, else given with --data. The whole chain runs as `phrasefuse` commands with
the built-in encoders:

    extract images (both manifests) -> index build (Tiny ImageNet pairs) -> phrases (CIFAR-10)
    -> fuse zeroshot -> fuse ablate per head (1, 2, 5, 20 shots and full data; rows with the label
    prior and with pseudo-shots from the index)

Stores, index and phrases are cached in --work: a re-run only re-trains. One table: top-1 mean ±
std over seeds, the paired gain over image-only, and what was kept and why (text kept in how many
seeds; the label prior's weight per seed and what chose it). The table is also written as a
result file (bench/tables.py's format: command, date, machine, one row per table row) to --results,
by default WORK/real-results.json; `--results bench/results/real-cifar10.json` then
`bench/tables.py` updates docs/benchmarks.md.

    .venv/bin/python bench/real.py --work /tmp/realwork                  # 5 seeds, linear + mlp + lgbm
    .venv/bin/python bench/real.py --work /tmp/realwork --seeds 3 --heads linear
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The data lives outside the repository (too large to commit); this is where it sits on the machine
# the committed results were measured on. Elsewhere, pass --data.
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "realdev"
ROWS = ("image", "image+phrases", "image+label-prior", "image+phrases+label-prior", "image+pseudo-shots",
        "image+phrases+pseudo-shots+label-prior")
LGBM_MIN_SHOTS = 5  # LightGBM's leaves need a few rows per class


def phrasefuse(*args, work: Path) -> str:
    """One CLI call; its stdout. Stderr (progress, warnings) goes to work/commands.log."""
    cmd = [sys.executable, "-m", "phrasefuse", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    with open(work / "commands.log", "a", encoding="utf-8") as log:
        log.write(f"$ phrasefuse {' '.join(map(str, args))}  # rc {proc.returncode}, "
                  f"{time.perf_counter() - start:.0f} s\n{proc.stderr}")
    if proc.returncode != 0:
        raise SystemExit(f"phrasefuse {' '.join(map(str, args))}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return proc.stdout


def build_features(data: Path, work: Path) -> dict[str, Path]:
    """Image stores, index and phrases, each made once (extract resumes; the others are skipped when present)."""
    c10, tin = data / "cifar10" / "manifest.parquet", data / "tinyimagenet"
    paths = {"c10": work / "c10-img", "tin": work / "tin-img", "index": work / "tin-index",
             "phrases": work / "c10-phrases"}
    phrasefuse("extract", "images", c10, "--out", paths["c10"], work=work)
    phrasefuse("extract", "images", tin / "manifest.parquet", "--out", paths["tin"], work=work)
    if not (paths["index"] / "meta.json").exists():
        phrasefuse("index", "build", "--pairs", tin / "pairs.parquet", "--images", paths["tin"], "--out",
                   paths["index"], work=work)
    if not (paths["phrases"] / "meta.json").exists():
        phrasefuse("phrases", "--index", paths["index"], "--images", paths["c10"], "--out", paths["phrases"],
                   work=work)
    return paths


def ablate(manifest: Path, paths: dict, head: str, shots: list[int], full: bool, seeds: int, work: Path) -> dict:
    out = work / f"ablate-{head}"
    args = ["fuse", "ablate", "--manifest", manifest, "--feature", f"image={paths['c10']}", "--feature",
            f"phrases={paths['phrases']}", "--head", head, "--seeds", str(seeds), "--label-prior", "phrases",
            "--pseudo-shots", paths["index"], "--out", out, "--json"]
    for row in ROWS:
        args += ["--row", row]
    if shots:
        args += ["--shots", ",".join(map(str, shots))]
        if full:
            args.append("--with-full")
    return json.loads(phrasefuse(*args, work=work))


def kept_text(row: dict, seeds: int) -> str:
    parts = []
    if "text_kept" in row:
        parts.append(f"phrases kept {row['text_kept']}/{seeds}")
    if "prior_weights" in row:
        weights = row["prior_weights"]
        used = sum(w > 0 for w in weights)
        detail = ", ".join(f"{w:.3g}" for w in weights)
        parts.append(f"prior used {used}/{seeds} (weights {detail}; {row['prior_chosen_by']})")
    if "pseudo_kept" in row:
        parts.append(f"pseudo-shots kept {sum(n > 0 for n in row['pseudo_kept'])}/{seeds} "
                     f"(rows {', '.join(map(str, row['pseudo_kept']))})")
    return "; ".join(parts)


COLUMNS = [["data", "{data}"], ["head", "{head}"], ["features", "{features}"],
           ["top-1", "{top1_mean:.1f} ± {top1_std:.1f}"], ["Δ vs image only", "{gain_mean:+.1f} ± {gain_std:.1f}"],
           ["kept (why)", "{kept}"]]


def result_rows(results: dict[str, dict], seeds: int) -> list[dict]:
    """One dict per table row, in the table's order (regime, then head): raw figures in points, so
    bench/tables.py formats them (and the committed file stays data, not text)."""
    entries = []
    heads = list(results)
    for head, data in results.items():
        for t in data["tables"]:
            for row in t["rows"]:
                entries.append((t["shots"] if t["shots"] is not None else 10_000, heads.index(head), head, t, row))
    entries.sort(key=lambda e: (e[0], e[1]))  # stable: within a head, the ablation's own row order
    rows = []
    for _, _, head, t, row in entries:
        gain = row.get("gain")
        rows.append({"data": "full" if t["shots"] is None else f"{t['shots']}-shot", "head": head,
                     "features": row["features"].replace(" (image only)", "").replace(" + label prior (phrases)",
                                                                                     " + label prior"),
                     "top1_mean": round(100 * row["top1"]["mean"], 2), "top1_std": round(100 * row["top1"]["std"], 2),
                     "gain_mean": round(100 * gain["mean"], 2) if gain else None,
                     "gain_std": round(100 * gain["std"], 2) if gain else None,
                     "kept": kept_text(row, seeds)})
    return rows


def machine() -> str:
    """What the figures depend on: cores, architecture, OS, and how busy the machine was."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()}), "
            f"load average {load:.1f} at the start")


def result_file(results: dict[str, dict], zeroshot: dict, seeds: int, command: str, seconds: float,
                started: str, host: str) -> dict:
    """The committed-results format of bench/tables.py for this run."""
    return {"title": "Quality on real images: CIFAR-10 with a Tiny ImageNet query corpus",
            "command": command, "date": started, "machine": host,
            "data": "CIFAR-10 as the target, Tiny ImageNet (WordNet synonyms as queries) as the query corpus; "
                    "built-in encoders",
            "notes": f"{seeds} seeds; test split, {next(iter(results.values()))['test_rows']} rows; top-1 and its "
                     f"paired gain over the image-only head of the same seed, mean ± std; {seconds:.0f} s in all.",
            "figures": {"zeroshot_top1": round(100 * zeroshot["metrics"]["top1"], 2),
                        "chance_top1": round(100 * zeroshot["chance_top1"], 2),
                        "test_rows": next(iter(results.values()))["test_rows"], "seeds": seeds},
            "columns": COLUMNS, "rows": result_rows(results, seeds)}


def table(results: dict[str, dict], seeds: int) -> str:
    lines = ["| data | head | features | top-1 | Δ vs image only | kept (why) |", "|---|---|---|---|---|---|"]
    order = {"full": 10_000}
    entries = []
    for head, data in results.items():
        for t in data["tables"]:
            for row in t["rows"]:
                entries.append((t["shots"] if t["shots"] is not None else order["full"], head, t, row))
    heads = list(results)
    entries.sort(key=lambda e: (e[0], heads.index(e[1])))
    for shots, head, t, row in entries:
        regime = "full" if t["shots"] is None else f"{t['shots']}-shot"
        features = row["features"].replace(" (image only)", "").replace(" + label prior (phrases)", " + label prior")
        gain = f"{100 * row['gain']['mean']:+.1f} ± {100 * row['gain']['std']:.1f}" if "gain" in row else ""
        lines.append(f"| {regime} | {head} | {features} | {100 * row['top1']['mean']:.1f} ± "
                     f"{100 * row['top1']['std']:.1f} | {gain} | {kept_text(row, seeds)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="The realdev folder (cifar10/, tinyimagenet/).")
    ap.add_argument("--work", type=Path, required=True, help="Cache of stores, index, phrases and tables.")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--heads", nargs="+", default=["linear", "mlp", "lgbm"], choices=["linear", "mlp", "lgbm"])
    ap.add_argument("--shots", nargs="+", type=int, default=[1, 2, 5, 20])
    ap.add_argument("--no-full", action="store_true", help="Skip the full-data table.")
    ap.add_argument("--results", type=Path, default=None,
                    help="Result file to write (default WORK/real-results.json); bench/results/real-cifar10.json "
                         "is the committed one.")
    ap.add_argument("--table-only", action="store_true",
                    help="Only the table, from the ablations already in --work (e.g. heads run in parallel).")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    started, host = time.strftime("%Y-%m-%d", time.gmtime()), machine()
    paths = build_features(args.data, args.work)
    manifest = args.data / "cifar10" / "manifest.parquet"
    zeroshot = json.loads(phrasefuse("fuse", "zeroshot", "--manifest", manifest, "--phrases", paths["phrases"],
                                     "--json", work=args.work))
    print(f"zero-shot from phrases (test split): top-1 {100 * zeroshot['metrics']['top1']:.1f} "
          f"(chance {100 * zeroshot['chance_top1']:.1f})", flush=True)
    results = {}
    for head in args.heads:
        if args.table_only:
            results[head] = json.loads((args.work / f"ablate-{head}" / "ablation.json").read_text(encoding="utf-8"))
            continue
        shots = [k for k in args.shots if head != "lgbm" or k >= LGBM_MIN_SHOTS]
        t = time.perf_counter()
        results[head] = ablate(manifest, paths, head, shots, not args.no_full, args.seeds, args.work)
        print(f"{head}: {time.perf_counter() - t:.0f} s", flush=True)
    command = "bench/real.py " + " ".join(sys.argv[1:])
    text = (f"CIFAR-10 (realdev: {results[args.heads[0]]['test_rows']} test rows), query corpus Tiny ImageNet; "
            f"{args.seeds} seeds, mean ± std; `{command}`; {time.perf_counter() - start:.0f} s.\n"
            f"Zero-shot from phrases: {100 * zeroshot['metrics']['top1']:.1f}% top-1 "
            f"(chance {100 * zeroshot['chance_top1']:.1f}%).\n\n{table(results, args.seeds)}\n")
    warnings = sorted({w for r in results.values() for w in r.get("warnings", [])})
    if warnings:
        text += "\n" + "\n".join(f"warning: {w}" for w in warnings) + "\n"
    name = "real" if args.table_only or len(args.heads) > 1 else f"real-{args.heads[0]}"
    (args.work / f"{name}.md").write_text(text, encoding="utf-8")
    (args.work / f"{name}.json").write_text(json.dumps({"zeroshot": zeroshot, "ablations": results}, indent=1),
                                         encoding="utf-8")
    results_path = args.results or args.work / "real-results.json"
    results_path.write_text(json.dumps(result_file(results, zeroshot, args.seeds, f".venv/bin/python {command}",
                                                   time.perf_counter() - start, started, host),
                                       indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(text)
    print(f"results: {results_path}")


if __name__ == "__main__":
    main()
