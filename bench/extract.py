"""Benchmark `extract images` against a plain PyTorch loop over the same images and model.

    .venv/bin/python bench/extract.py [--n 512] [--size 640x480] [--model builtin:efficientnet-lite0]
                                      [--no-plain] [--workers N]

Prints, in one run, images/s of:
  plain loop   PIL open + the encoder's transform + model, one process, batch 64, torch.no_grad
  model only   the same model on pre-decoded tensors (the ceiling for this model on this machine),
               measured right before and right after the extract, so that a load change on a
               shared machine shows as a spread instead of skewing the ratio
  extract      `phrasefuse extract images` (the job function, model already loaded)
and the ratios extract / plain loop and extract / model only (efficiency, against the mean of
the two model-only measurements).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--size", default="640x480", help="generated JPEG size WxH")
    parser.add_argument("--model", default="builtin:efficientnet-lite0")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--work", default=None, help="folder for the generated images (kept between runs)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop (the slowest line)")
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from phrasefuse.extract.encoders import load_image_encoder
    from phrasefuse.extract.jobs import extract_images
    from phrasefuse.synthetic import generate_images

    w, h = (int(x) for x in args.size.split("x"))
    work = Path(args.work or Path(tempfile.gettempdir()) / f"phrasefuse-bench-extract-{args.n}-{w}x{h}")
    manifest = generate_images(work / "data", args.n, seed=0, size=(w, h))
    paths = [str(manifest.parent / p) for p in pq.read_table(manifest)["image"].to_pylist()]
    encoder = load_image_encoder(args.model, "cpu")
    print(f"{args.n} JPEGs of {w}x{h}, model {args.model} (input {encoder.preprocess.get('input_size')}), "
          f"batch {args.batch_size}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    # The plain loop a user would write: decode full size, transform, model; no workers, default layout.
    model = encoder.module
    plain = None
    if not args.no_plain:
        model.to(memory_format=torch.contiguous_format)
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(paths), args.batch_size):
                batch = [encoder.transform(Image.open(p).convert("RGB")) for p in paths[i:i + args.batch_size]]
                torch.nn.functional.normalize(model(torch.stack(batch)), dim=-1)
        plain = args.n / (time.perf_counter() - start)
        print(f"plain loop   {plain:8.1f} images/s")

    model.to(memory_format=torch.channels_last)
    pixels = torch.stack([encoder.transform(Image.open(p).convert("RGB")) for p in paths[:args.batch_size]])
    encoder.encode(pixels)  # warm-up
    reps = max(1, args.n // args.batch_size)

    def model_only() -> float:
        start = time.perf_counter()
        for _ in range(reps):
            encoder.encode(pixels)
        return reps * args.batch_size / (time.perf_counter() - start)

    before = model_only()
    print(f"model only   {before:8.1f} images/s (pre-decoded tensors, channels-last, inference_mode; before extract)")

    out = work / "store"
    shutil.rmtree(out, ignore_errors=True)
    summary = extract_images(manifest, out, model=args.model, batch_size=args.batch_size, workers=args.workers,
                             device="cpu", progress=False)
    assert summary.embedded == args.n, summary.line()
    extract = args.n / summary.seconds
    print(f"extract      {extract:8.1f} images/s ({summary.line()})")
    after = model_only()
    print(f"model only   {after:8.1f} images/s (after extract)")
    if plain:
        print(f"extract / plain loop  {extract / plain:.2f}x")
    print(f"extract / model only  {extract / ((before + after) / 2):.2f} (efficiency; against "
          f"{extract / before:.2f} before and {extract / after:.2f} after)")


if __name__ == "__main__":
    main()
