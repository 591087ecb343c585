"""Peak memory of the commands whose memory must be bounded by settings, not by input size.

    .venv/bin/python bench/memory.py [lookup] [parquet] [heads] [text] [--code PATH] [--classes 5000,15000]
                                     [--heads linear,mlp]

Each case builds its inputs in a temp folder, runs the phrasefuse CLI twice at two input sizes, in
a fresh process each (`/usr/bin/time`: peak RSS of the process), and prints one line per run:

  lookup   `index lookup` of 100 and 600 (--inputs) distinct noisy 1000x1000 JPEGs (~1 MB each)
  parquet  `extract images` of one uncompressed Parquet file of 40 and 400 rows x 2 MB of bytes
  heads    `fuse train --head linear` and `--head mlp` (--heads), 3 rows per class (train, val, test), dim 32,
           at --classes
  text     `extract texts` of a 2-row table whose first cell is 1 MB and 20 MB of text

--code PATH runs the CLI of another checkout (e.g. `git archive` of an older commit unpacked in
/tmp), so that before and after are measured by the same script under the same conditions.
Peak RSS is noisy on a shared machine only by a few percent; time is not reported as a figure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def run(code: Path, args: list, label: str) -> None:
    """One CLI run in a fresh process; prints its exit status, peak RSS and wall time."""
    env = dict(os.environ, PYTHONPATH=str(code), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.NamedTemporaryFile("r") as out:
        proc = subprocess.run(["/usr/bin/time", "-f", "%M %e", "-o", out.name, sys.executable, "-m", "phrasefuse",
                               *map(str, args)], env=env, cwd=code, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        kib, seconds = out.read().split()[-2:]
    error = f"  ({proc.stderr.strip().splitlines()[-1][:100]})" if proc.returncode and proc.stderr.strip() else ""
    print(f"{label:<44} exit {proc.returncode}  peak RSS {int(kib) / 1024:7.0f} MB  {float(seconds):6.1f} s{error}",
          flush=True)


def lookup(code: Path, tmp: Path, sizes: list[int]) -> None:
    from PIL import Image

    (tmp / "img").mkdir()
    rows, pairs = [], []
    for i in range(20):
        Image.new("RGB", (32, 32), (12 * i, 100, 50)).save(tmp / "img" / f"{i}.jpg")
        rows.append({"id": f"r{i}", "image": f"img/{i}.jpg"})
        pairs.append({"query": f"q{i % 4}", "image_id": f"r{i}"})
    pq.write_table(pa.Table.from_pylist(rows), tmp / "m.parquet")
    pq.write_table(pa.Table.from_pylist(pairs), tmp / "pairs.parquet")
    env = dict(os.environ, PYTHONPATH=str(code))
    for cmd in (["extract", "images", tmp / "m.parquet", "--out", tmp / "store", "--workers", "0"],
                ["index", "build", "--pairs", tmp / "pairs.parquet", "--images", tmp / "store", "--out", tmp / "index"]):
        subprocess.run([sys.executable, "-m", "phrasefuse", *map(str, cmd)], env=env, cwd=code, check=True,
                       stdout=subprocess.DEVNULL)
    (tmp / "big").mkdir()
    noise = np.random.default_rng(0).integers(0, 255, (1000, 1000, 3), dtype=np.uint8)
    files = []
    for i in range(max(sizes)):  # distinct images: no input is a copy of another (lookup reuses a copy's result)
        noise[:8, :8] = i % 256, i // 256, 0
        files.append(tmp / "big" / f"{i:04d}.jpg")
        Image.fromarray(noise).save(files[-1], quality=95)
    for n in sizes:
        run(code, ["index", "lookup", tmp / "index", *files[:n], "-k", "1"], f"index lookup, {n} inputs of ~1 MB")


def parquet(code: Path, tmp: Path) -> None:
    blob = os.urandom(2 * 2**20)
    for n in (40, 400):
        cells = [blob[:-8] + i.to_bytes(8, "little") for i in range(n)]  # random bytes: error rows, reading measured
        pq.write_table(pa.table({"id": [f"k{i}" for i in range(n)], "image": pa.array(cells, pa.large_binary())}),
                       tmp / f"b{n}.parquet", compression="none", row_group_size=64)
        del cells
        run(code, ["extract", "images", tmp / f"b{n}.parquet", "--out", tmp / f"st{n}", "--workers", "0"],
            f"extract images, Parquet {n} rows x 2 MB")


def heads(code: Path, tmp: Path, classes: list[int], kinds: list[str]) -> None:
    dim, per = 32, 3
    for k in classes:
        folder = tmp / f"k{k}"
        (folder / "emb" / "img_emb").mkdir(parents=True)
        (folder / "emb" / "metadata").mkdir()
        rng = np.random.default_rng(0)
        lab = np.repeat(np.arange(k), per)
        x = rng.normal(size=(k, dim)).astype(np.float32)[lab] + 0.1 * rng.normal(size=(k * per, dim)).astype(np.float32)
        np.save(folder / "emb" / "img_emb" / "img_emb_0.npy", x)
        ids = [f"i{j}" for j in range(k * per)]
        pq.write_table(pa.table({"id": ids}), folder / "emb" / "metadata" / "metadata_0.parquet")
        pq.write_table(pa.table({"id": ids, "label": [f"c{v}" for v in lab],
                                 "split": np.array(["train", "val", "test"])[np.arange(k * per) % per]}),
                       folder / "m.parquet")
        subprocess.run([sys.executable, "-m", "phrasefuse", "import", str(folder / "emb"), "--out",
                        str(folder / "store"), "--encoder-name", "rand", "--weights-sha256", "abc"],
                       env=dict(os.environ, PYTHONPATH=str(code)), cwd=code, check=True, stdout=subprocess.DEVNULL)
        for head in kinds:
            run(code, ["fuse", "train", "--manifest", folder / "m.parquet", "--feature", f"image={folder / 'store'}",
                       "--head", head, "--out", folder / f"head-{head}"], f"fuse train --head {head}, {k} classes")


def text(code: Path, tmp: Path) -> None:
    for mb in (1, 20):
        pq.write_table(pa.table({"id": ["a", "b"], "title": ["word " * (mb * 200_000), "short"]}), tmp / f"m{mb}.parquet")
        run(code, ["extract", "texts", tmp / f"m{mb}.parquet", "--col", "title", "--out", tmp / f"st{mb}"],
            f"extract texts, one cell of {mb} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", default=["lookup", "parquet", "heads", "text"])
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose CLI is measured (default: this one)")
    parser.add_argument("--classes", default="5000,15000", help="heads: class counts, comma-separated")
    parser.add_argument("--heads", default="linear,mlp", help="heads: kinds, comma-separated")
    parser.add_argument("--inputs", default="100,600", help="lookup: input counts, comma-separated")
    args = parser.parse_args()
    for case in args.cases:
        with tempfile.TemporaryDirectory() as tmp:
            if case == "heads":
                heads(args.code.resolve(), Path(tmp), [int(c) for c in args.classes.split(",")], args.heads.split(","))
            elif case == "lookup":
                lookup(args.code.resolve(), Path(tmp), [int(n) for n in args.inputs.split(",")])
            else:
                {"parquet": parquet, "text": text}[case](args.code.resolve(), Path(tmp))


if __name__ == "__main__":
    main()
