"""Benchmark the commands that have nothing to do: what a rerun costs when every row is already done.

    .venv/bin/python bench/noop.py [--work DIR] [--repeat 3] [--code DIR]

Once (kept in --work, default work/bench-noop): the demo's generated data (60 images, 40 query
images, titles, pairs) and `phrasefuse run` of a small config with the built-in encoders, so that
every store, the index and the phrases exist. Then, each in a fresh process (`python -m phrasefuse`,
as a user runs it), --repeat times, prints the wall time and the peak RSS (the child's own
ru_maxrss, from os.wait4) of:
  extract images   the run's image manifest into its image store: every row already stored
  phrases          the run's index over its image store into its phrases store: 0 new images
  run              the same config again: every stage up to date
--code DIR runs the CLI of another checkout (e.g. `git archive BASE | tar -x -C /tmp/base`, then
--code /tmp/base) on the same folders, for before/after figures in the same conditions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
work = "work"

[data]
manifest = "data/manifest.parquet"
text_columns = ["title"]

[phrases]
pairs = "data/pairs.parquet"
images = "data/query_manifest.parquet"

[[heads]]
name = "fused"
kind = "linear"
features = ["image", "title", "phrases"]
"""


def prepare(work: Path, code: Path) -> None:
    """The data and a first run (skipped when --work already holds them)."""
    if (work / "work" / "stores" / "phrases" / "meta.json").is_file():
        return
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", "import sys; from phrasefuse.synthetic import generate_demo; "
                    "generate_demo(sys.argv[1], n=60, n_query=40)", str(work / "data")],
                   check=True, env=env_for(code))
    (work / "config.toml").write_text(CONFIG)
    print("first run (every stage runs, models load)...", flush=True)
    subprocess.run([sys.executable, "-m", "phrasefuse", "run", "config.toml", "--json"], cwd=work, check=True,
                   env=env_for(code), stdout=subprocess.DEVNULL)


def env_for(code: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def measure(args: list[str], cwd: Path, code: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one CLI process; its exit status must be 0."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "phrasefuse", *args], cwd=cwd, env=env_for(code),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (not the max over all children)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"phrasefuse {' '.join(args)} exited {proc.returncode}:\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024  # Linux: KB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "work" / "bench-noop")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose phrasefuse runs (default: this one)")
    opts = parser.parse_args()
    work, code = opts.work.resolve(), opts.code.resolve()
    prepare(work, ROOT)  # the folders are made by this checkout; --code only changes what is measured
    stores = work / "work" / "stores"
    commands = {
        "extract images": ["extract", "images", "data/manifest.parquet", "--out", str(stores / "image")],
        "phrases": ["phrases", "--index", str(work / "work" / "index"), "--images", str(stores / "image"),
                    "--out", str(stores / "phrases")],
        "run": ["run", "config.toml"],
        "--version": ["--version"],  # the interpreter and the CLI's own imports: the floor
    }
    print(f"code: {code}; {opts.repeat} runs each, fresh processes; median (min-max)")
    for name, args in commands.items():
        figures = [measure(args, work, code) for _ in range(opts.repeat)]
        walls, rss = [f[0] for f in figures], [f[1] for f in figures]
        print(f"{name:15s} {statistics.median(walls):6.2f} s ({min(walls):.2f}-{max(walls):.2f})   "
              f"peak RSS {statistics.median(rss):7.0f} MB ({min(rss):.0f}-{max(rss):.0f})", flush=True)


if __name__ == "__main__":
    main()
