"""Benchmark `extract images` against a plain PyTorch loop over the same images and model.

    .venv/bin/python bench/extract.py [--n 2048] [--size 640x480] [--model builtin:efficientnet-lite0]
                                      [--repeat 3] [--no-plain] [--workers N] [--device cpu|cuda] [--json PATH]
                                      [--replicas N | --no-replicas]

Prints images/s of:
  plain loop    PIL open + the encoder's transform + model, one process, batch 64, torch.no_grad
  model only    the same model on pre-decoded, normalised tensors (the ceiling for this model on this
                machine), measured before the first and after every extract, so that a load change on
                a shared machine shows as a spread instead of skewing the ratio
  prepare only  read, hash, decode, resize and crop in the job's DataLoader workers, no model
  extract       `phrasefuse extract images` (the job function, model already loaded, fresh store),
                the single-process path (--replicas 1)
  replicas      on a CPU, the same with --replicas N (default: one per core), run right after each
                extract (A B A B...), and the ratio replicas / extract per pair (median over the
                repeats): on the summary's clock (store opened to last shard, as "extract") and on
                the whole call's (model loading included: the replicas load theirs beside this
                process's); then a replica's peak RSS (VmHWM, polled from /proc: Linux)
and the efficiency: extract / model only (each extract against the mean of the model-only
measurements either side of it; the median over the repeats). On a CPU the model already uses
every core, so preparing images cannot overlap it: the bound is then
1 / (1/model + 1/prepare), printed as "serial bound". On CUDA (--device cuda) the plain loop
moves each batch to the device, model only runs on tensors already there (under the encoder's
autocast), and the images are prepared on the CPU beside the device. --json PATH writes the figures.
--results DIR writes them as result files for bench/tables.py (DIR/extract.json, and DIR/replicas.json
when the replica arm ran: command, date, machine, one row per figure or repeat); `--results
bench/results` updates the committed ones, then `bench/tables.py` re-renders docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--size", default="640x480", help="generated JPEG size WxH")
    parser.add_argument("--model", default="builtin:efficientnet-lite0")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--work", default=None, help="folder for the generated images (kept between runs)")
    parser.add_argument("--repeat", type=int, default=3, help="extract runs (each into a fresh store)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop (the slowest line)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--replicas", type=int, default=None, help="replica arm: model processes (default: cores)")
    parser.add_argument("--no-replicas", action="store_true", help="skip the replica arm")
    parser.add_argument("--results", type=Path, default=None, help="write result files (bench/tables.py) here")
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d", time.gmtime())

    import torch
    from PIL import Image

    from phrasefuse.engine import cpu_cores
    from phrasefuse.extract.encoders import load_image_encoder
    from phrasefuse.extract.jobs import extract_images
    from phrasefuse.manifests import read_manifest
    from phrasefuse.synthetic import generate_images

    w, h = (int(x) for x in args.size.split("x"))
    work = Path(args.work or Path(tempfile.gettempdir()) / f"phrasefuse-bench-extract-{args.n}-{w}x{h}")
    manifest = generate_images(work / "data", args.n, seed=0, size=(w, h))
    rows = read_manifest(manifest, require_image=True).table  # image paths resolved, as the job reads them
    paths = rows["image"].to_pylist()
    encoder = load_image_encoder(args.model, args.device)
    device = encoder.device
    print(f"{args.n} JPEGs of {w}x{h}, model {args.model} (input {encoder.preprocess.get('input_size')}), "
          f"batch {args.batch_size}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}")

    # The plain loop a user would write: decode full size, transform, model; no workers, default layout.
    model = encoder.module
    plain = None
    if not args.no_plain:
        model.to(memory_format=torch.contiguous_format)
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(paths), args.batch_size):
                batch = [encoder.transform(Image.open(p).convert("RGB")) for p in paths[i:i + args.batch_size]]
                torch.nn.functional.normalize(model(torch.stack(batch).to(device)), dim=-1).cpu()
        plain = args.n / (time.perf_counter() - start)
        print(f"plain loop   {plain:8.1f} images/s")

    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    pixels = torch.stack([encoder.transform(Image.open(p).convert("RGB")) for p in paths[:args.batch_size]])
    pixels = pixels.to(device)  # model only: the tensors already on the device
    encoder.encode(pixels)  # warm-up
    reps = max(1, args.n // args.batch_size)

    def model_only() -> float:
        start = time.perf_counter()
        for _ in range(reps):
            encoder.encode(pixels)
        return reps * args.batch_size / (time.perf_counter() - start)

    speeds = [model_only()]
    print(f"model only   {speeds[0]:8.1f} images/s (pre-decoded tensors on {device}, inference_mode)")
    prepare = prepare_only(rows, encoder, args.batch_size, args.workers)
    print(f"prepare only {prepare:8.1f} images/s (read, hash, decode, resize, crop in the job's workers; no model)")

    out = work / "store"
    ratios, replica_arm = [], device.type == "cpu" and not args.no_replicas
    replicas = args.replicas or cpu_cores()
    pairs: list[tuple[float, float, float, float]] = []  # (extract, replicas) images/s: summary's clock, whole call

    def run_extract(count: int) -> tuple[float, float]:
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        summary = extract_images(manifest, out, model=args.model, batch_size=args.batch_size,
                                 workers=args.workers, device=args.device, progress=False, replicas=count)
        assert summary.embedded == args.n, summary.text()
        return args.n / summary.seconds, args.n / (time.perf_counter() - start)

    for _ in range(args.repeat):
        extract, extract_wall = run_extract(1)
        speeds.append(model_only())
        ratios.append(extract / ((speeds[-2] + speeds[-1]) / 2))
        print(f"extract      {extract:8.1f} images/s ({args.n / extract:.1f} s; efficiency {ratios[-1]:.2f}; "
              f"whole call {extract_wall:.1f} images/s)")
        print(f"model only   {speeds[-1]:8.1f} images/s")
        if replica_arm:
            stop = threading.Event()
            watcher = threading.Thread(target=watch_replicas, args=(stop,), daemon=True)
            watcher.start()
            fast, fast_wall = run_extract(replicas)
            stop.set()
            watcher.join()
            pairs.append((extract, fast, extract_wall, fast_wall))
            print(f"replicas     {fast:8.1f} images/s ({replicas} x {max(1, cpu_cores() // replicas)} thread; "
                  f"{fast / extract:.2f}x extract; whole call {fast_wall:.1f} images/s, {fast_wall / extract_wall:.2f}x)")
    replica_figures = report_replicas(pairs, replicas) if pairs else None
    model_speed = statistics.mean(speeds)
    bound = 1 / (1 / model_speed + 1 / prepare)
    if plain:
        print(f"extract / plain loop  {extract / plain:.2f}x (last run)")
    print(f"serial bound {bound:8.1f} images/s = {bound / model_speed:.2f} of model only (mean {model_speed:.1f})")
    print(f"efficiency   {statistics.median(ratios):.2f} (median of {', '.join(f'{r:.2f}' for r in ratios)})")
    if args.json:
        figures = {"model": args.model, "device": str(device), "images": args.n, "batch_size": args.batch_size,
                   "plain_loop_images_per_s": plain, "model_only_images_per_s": round(model_speed, 1),
                   "prepare_only_images_per_s": round(prepare, 1), "extract_images_per_s": round(extract, 1),
                   "efficiency": round(statistics.median(ratios), 3),
                   "extract_over_plain_loop": round(extract / plain, 2) if plain else None,
                   "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
                   "replica_arm": replica_figures}
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if args.results:
        write_results(args, started, plain=plain, extract=extract, model_speed=model_speed, prepare=prepare,
                      bound=bound / model_speed, efficiency=statistics.median(ratios), pairs=pairs,
                      replicas=replicas)


def write_results(args: argparse.Namespace, started: str, *, plain: float | None, extract: float,
                  model_speed: float, prepare: float, bound: float, efficiency: float,
                  pairs: list[tuple[float, float, float, float]], replicas: int) -> None:
    """The figures as bench/tables.py result files: what docs/benchmarks.md's tables are rendered from."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    common = {"command": ".venv/bin/python bench/extract.py " + " ".join(sys.argv[1:]), "date": started,
              "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()}), device "
                         f"{args.device}, load average {load:.1f} at the end",
              "data": f"{args.n:,} generated {args.size} JPEGs, {args.model}, batch {args.batch_size}"}
    args.results.mkdir(parents=True, exist_ok=True)
    rows = [{"what": "plain loop (PIL open + transform + model, one process)",
             "rate": f"{plain:.1f}" if plain else None, "note": ""},
            {"what": "phrasefuse extract images", "rate": f"{extract:.1f}",
             "note": f"{extract / plain:.2f}x the plain loop (last run)" if plain else ""},
            {"what": "the model on pre-decoded tensors", "rate": f"{model_speed:.1f}",
             "note": f"efficiency {efficiency:.2f} (median over {args.repeat} extracts)"},
            {"what": "preparation only (decode workers)", "rate": f"{prepare:.1f}",
             "note": f"serial bound {bound:.2f} of the model's speed"}]
    extract_file = {"title": "extract images against a plain PyTorch loop", **common,
                    "columns": [["what", "{what}"], ["images/s", "{rate}"], ["note", "{note}"]], "rows": rows}
    (args.results / "extract.json").write_text(json.dumps(extract_file, indent=1) + "\n", encoding="utf-8")
    if pairs:
        replicas_file = {"title": f"extract --replicas {replicas} against one process", **common,
                         "columns": [["repeat", "{repeat}"], ["one process, images/s", "{single:.1f}"],
                                     [f"{replicas} replicas, images/s", "{replicas:.1f}"], ["ratio", "{ratio:.2f}x"]],
                         "notes": f"a replica's peak RSS {replica_peak_rss / 2**30:.2f} GiB",
                         "rows": [{"repeat": i + 1, "single": round(a, 1), "replicas": round(b, 1),
                                   "ratio": round(b / a, 2)} for i, (a, b, _, _) in enumerate(pairs)]}
        (args.results / "replicas.json").write_text(json.dumps(replicas_file, indent=1) + "\n", encoding="utf-8")
    print(f"results: {args.results}")


replica_peak_rss = 0  # bytes: the largest VmHWM seen of a replica process (`watch_replicas`)


def watch_replicas(stop: threading.Event) -> None:
    """Until `stop`: every 0.2 s, the peak RSS (VmHWM) of this process's spawned children (the replicas)."""
    global replica_peak_rss
    while not stop.wait(0.2):
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                text = status.read_text()
                spawned = b"multiprocessing.spawn" in (status.parent / "cmdline").read_bytes()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
            if spawned and int(fields.get("PPid", "0")) == os.getpid() and "VmHWM" in fields:
                replica_peak_rss = max(replica_peak_rss, int(fields["VmHWM"].split()[0]) * 1024)


def report_replicas(pairs: list[tuple[float, float, float, float]], replicas: int) -> dict:
    """Prints the replica arm's medians (pairs: extract, replicas images/s on the summary's clock, then
    on the whole call's) and the largest child's peak RSS; returns them for --json."""
    speedup = statistics.median(b / a for a, b, _, _ in pairs)
    wall_speedup = statistics.median(d / c for _, _, c, d in pairs)
    fast, single = statistics.median(b for _, b, _, _ in pairs), statistics.median(a for a, _, _, _ in pairs)
    child_rss = replica_peak_rss / 2**30
    print(f"replicas / extract {speedup:.2f}x (median of {', '.join(f'{b / a:.2f}' for a, b, _, _ in pairs)}); "
          f"whole call {wall_speedup:.2f}x; medians: replicas {fast:.1f} images/s, extract {single:.1f}")
    print(f"replica peak RSS {child_rss:.2f} GiB (the largest replica's: model, batch, activations), "
          f"this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return {"replicas": replicas, "replicas_over_extract": round(speedup, 3),
            "replicas_over_extract_whole_call": round(wall_speedup, 3), "replicas_images_per_s": round(fast, 1),
            "extract_images_per_s_median": round(single, 1), "replica_peak_rss_gib": round(child_rss, 2)}


def prepare_only(rows, encoder, batch_size: int, workers: int | None) -> float:
    """Images/s of the job's DataLoader alone: what the workers deliver when nothing else runs."""
    import pyarrow as pa

    from phrasefuse.extract.mappers import image_loader

    loader = image_loader(rows, pa.array([], pa.string()), encoder, batch_size, workers)
    start = time.perf_counter()
    n = sum(len(batch["ids"]) for batch in loader)
    return n / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
