"""Benchmark: the prototype index's automatic FAISS choice against exact search (not a test).

On random unit vectors (default: 1,000,000 prototypes of dim 512), in one run:
  exact   faiss.IndexFlatIP: build time, search throughput on one batch of 10,000 queries;
          its results are the ground truth;
  auto    what `phrasefuse index build` would choose (phrasefuse.index.ann.build_faiss_index: kind
          under --memory, k-means training, search setting tuned on 1,000 other queries):
          build time (training, adding and tuning included), throughput on the same batch,
          recall@10 against exact search.

Two kinds of random data (--data):
  clustered  (default) vectors drawn around random centres, 100 per centre (cos to their centre
             ~0.7), as embeddings of real images and phrases cluster (a corpus of queries holds many
             near-paraphrases of each); queries are drawn the same way;
  uniform    i.i.d. uniform on the sphere: no structure at all, the worst case for any
             approximate index (the true 10 nearest are barely nearer than the rest).

    .venv/bin/python bench/index.py                        # the issue's setting
    .venv/bin/python bench/index.py --data uniform
    .venv/bin/python bench/index.py --n 200000 --kind hnsw

`--phrases` measures the pipeline at scale instead (the real job functions, on disk): --prototypes
phrase centres (default 100,000) drawn clustered as above (--per-centre, --spread: a corpus of
queries holds many near-paraphrases), an image store of --images vectors (default 1,000,000,
float16) each near one phrase centre (--image-spread), a pairs table putting each image on its
phrase, `index build` on it, then `phrases` (k=3, the built-in text model embedding each
distinct phrase once):

    .venv/bin/python bench/index.py --phrases               # 1,000,000 images x 100,000 prototypes
    .venv/bin/python bench/index.py --phrases --images 100000 --prototypes 10000

`--scale` measures `index build` itself on a corpus larger than its --memory: a generated query
image store of 2,000,000 x 256 (float16) and a pairs table of 20,000,000 rows over 1,000,000
queries (--fraction 0.25: a quarter of each), written straight into the store format in --work
(default: phrasefuse-bench-scale in the temporary folder); the build runs in a fresh process (`phrasefuse index build --memory 2G`,
--engine local|ray), whose wall time and peak RSS are printed with the chosen index's recall@10:

    .venv/bin/python bench/index.py --scale                 # the setting of docs/benchmarks.md
    .venv/bin/python bench/index.py --scale --fraction 0.25 --memory 1G
    .venv/bin/python bench/index.py --scale --results bench/results/index-scale.json   # adds its row

--scale --results FILE adds the run as a row of a result file for bench/tables.py (created when
absent; the file's command, date and machine become this run's).

--device cuda runs both on the GPU (the gpu extra: faiss-gpu): the exact baseline and the build's
training and tuning, the timed search on a GPU copy of the index, and `phrases` with its search and
text model there. --json PATH also writes the figures to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phrasefuse.index.ann import build_faiss_index, faiss_threads, human_bytes, parse_memory  # noqa: E402
from phrasefuse.index.devices import GpuCopy, on_device  # noqa: E402
from phrasefuse.index.kinds import EXACT, Plan  # noqa: E402
from phrasefuse.index.tuning import recall_at_k, search, set_search_value  # noqa: E402


def random_unit(rng: np.random.Generator, n: int, dim: int, centres: np.ndarray | None, spread: float,
                chunk: int = 100_000) -> np.ndarray:
    """n unit vectors: uniform on the sphere, or centre + spread * gaussian noise (normalised)."""
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        if centres is not None:
            x *= spread / np.sqrt(dim)
            x += centres[rng.integers(0, len(centres), m)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:start + m] = x
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="prototypes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=10_000, help="the timed search batch")
    parser.add_argument("--data", choices=("clustered", "uniform"), default="clustered")
    parser.add_argument("--per-centre", type=int, default=100,
                        help="clustered: vectors per centre (a query's 10 nearest are then mostly its centre's)")
    parser.add_argument("--spread", type=float, default=1.0, help="clustered: noise norm relative to the centre")
    parser.add_argument("--kind", default="auto", help="auto, or force flat|hnsw|ivf-flat|ivf-pq")
    parser.add_argument("--memory", default=None, help="index memory budget, e.g. 1G (default: half the RAM)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phrases", action="store_true", help="bench index build + phrases on a store instead")
    parser.add_argument("--images", type=int, default=1_000_000, help="--phrases: stored image embeddings")
    parser.add_argument("--prototypes", type=int, default=100_000, help="--phrases: query phrases (prototypes)")
    parser.add_argument("--image-spread", type=float, default=0.5, help="--phrases: image noise around its phrase")
    parser.add_argument("--work", default=None, help="--phrases: folder for the store, pairs, index and output")
    parser.add_argument("--scale", action="store_true", help="bench a streaming index build at scale instead")
    parser.add_argument("--fraction", type=float, default=1.0, help="--scale: this share of the full sizes")
    parser.add_argument("--engine", choices=("local", "ray"), default="local", help="--scale: the build's engine")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--results", type=Path, default=None, help="--scale: add the run to this result file")
    args = parser.parse_args()
    if args.phrases:
        bench_phrases(args)
        return
    if args.scale:
        bench_scale(args)
        return

    threads = faiss_threads()
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    centres = None
    if args.data == "clustered":
        centres = random_unit(rng, max(1, args.n // args.per_centre), args.dim, None, 0)
    vectors = random_unit(rng, args.n, args.dim, centres, args.spread)
    queries = random_unit(rng, args.queries, args.dim, centres, args.spread)
    tuning = random_unit(rng, 1000, args.dim, centres, args.spread)  # the build's own sample queries
    what = (f"clustered around {len(centres):,} centres (spread {args.spread})" if centres is not None
            else "uniform on the sphere")
    print(f"data: {args.n:,} x {args.dim} random unit vectors, {what}; {args.queries:,} queries "
          f"({time.perf_counter() - t0:.0f} s to generate); faiss threads {threads}, cpus {os.cpu_count()}")

    t0 = time.perf_counter()
    import faiss

    cpu_flat = faiss.IndexFlatIP(args.dim)
    cpu_flat.add(vectors)
    flat = on_device(cpu_flat, EXACT, args.device)
    exact_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact_scores, _ = search(flat, queries, 10)
    exact_seconds = time.perf_counter() - t0
    exact_qps = args.queries / exact_seconds
    del flat, cpu_flat
    print(f"exact  Flat: build {exact_build:6.1f} s | search {exact_qps:9,.0f} queries/s "
          f"(batch {args.queries:,}, {exact_seconds:.1f} s, {args.device}) | recall@10 1.000")

    t0 = time.perf_counter()
    index, report = build_faiss_index(vectors, tuning, kind=args.kind, memory=parse_memory(args.memory), seed=args.seed,
                                device=args.device)
    build_seconds = time.perf_counter() - t0
    searcher = on_device(index, report.kind, report.device)
    if isinstance(searcher, GpuCopy):
        set_search_value(searcher, Plan(report.kind, args.dim), report.search_value)
    search(searcher, queries[:100], 10)  # warm-up (GPU: kernels, temporary memory)
    t0 = time.perf_counter()
    _, found = search(searcher, queries, 10)
    seconds = time.perf_counter() - t0
    recall = recall_at_k(vectors, queries, found, exact_scores)
    setting = f" {report.search_param}={report.search_value}" if report.search_param else ""
    print(f"{args.kind:6} {report.factory}{setting}: build {build_seconds:6.1f} s | search "
          f"{args.queries / seconds:9,.0f} queries/s (batch {args.queries:,}, {seconds:.1f} s) | recall@10 {recall:.3f}")
    print(f"       {report.reason}; index {human_bytes(report.bytes)}; recall@10 at build time "
          f"{report.recall_at_10:.3f}; tuning " + ", ".join(f"{s.value}: {s.recall:.3f}" for s in report.tuning))
    verdict = "meets" if recall >= 0.95 and args.queries / seconds >= 10 * exact_qps else "misses"
    print(f"speed-up {args.queries / seconds / exact_qps:.1f}x exact at recall@10 {recall:.3f}: {verdict} the goal "
          f"(recall@10 >= 0.95 at >= 10x exact throughput)")
    write_json(args.json, {"device": args.device, "built_on": report.device, "n": args.n, "dim": args.dim,
                           "queries": args.queries, "data": args.data, "index": report.factory,
                           "search_value": report.search_value, "build_seconds": round(build_seconds, 2),
                           "queries_per_second": round(args.queries / seconds, 1), "recall_at_10": round(recall, 4),
                           "exact_queries_per_second": round(exact_qps, 1), "exact_build_seconds": round(exact_build, 2)})


def write_json(path: str | None, figures: dict) -> None:
    if path:
        peak = None
        if figures.get("device") == "cuda":
            import torch

            peak = torch.cuda.max_memory_allocated() or None  # torch's own share (FAISS allocates beside it)
        Path(path).write_text(json.dumps({**figures, "peak_torch_gpu_memory_bytes": peak}, indent=2))


def bench_phrases(args: argparse.Namespace) -> None:
    """index build + phrases through the job functions, on a generated store of args.images vectors."""
    import shutil
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from phrasefuse.index.build import build_index
    from phrasefuse.index.phrases import generate_phrases
    from phrasefuse.store import StoreWriter, new_meta

    work = Path(args.work or Path(tempfile.gettempdir()) / f"phrasefuse-bench-phrases-{args.images}-{args.prototypes}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    groups = random_unit(rng, max(1, args.prototypes // args.per_centre), args.dim, None, 0)
    centres = random_unit(rng, args.prototypes, args.dim, groups, args.spread)
    encoder = {"spec": f"random:{args.dim}", "family": "random", "name": f"clustered-{args.dim}",
               "weights_sha256": "0" * 64, "dim": args.dim}
    meta = new_meta(modality="image", encoder=encoder, dtype="float16", source={"manifest": "generated", "column": "image"})
    chunk = 100_000
    query, image_id = [], []
    with StoreWriter.open(work / "img", meta, shard_size=chunk) as writer:
        for start in range(0, args.images, chunk):
            m = min(chunk, args.images - start)
            which = rng.integers(0, args.prototypes, m)
            x = rng.standard_normal((m, args.dim), dtype=np.float32) * (args.image_spread / np.sqrt(args.dim))
            x += centres[which]
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            ids = pa.array([f"i{i:08d}" for i in range(start, start + m)])
            writer.add(ids, ids, x)
            query.append(pa.array(np.char.add("phrase ", which.astype(str))))
            image_id.append(ids)
    pq.write_table(pa.table({"query": pa.chunked_array(query), "image_id": pa.chunked_array(image_id)}),
                   work / "pairs.parquet")
    print(f"data: {args.images:,} image embeddings of dim {args.dim} (float16 store) around {args.prototypes:,} "
          f"phrase centres (themselves around {len(groups):,} groups), one pair per image "
          f"({time.perf_counter() - t0:.0f} s to generate); cpus {os.cpu_count()}")

    t0 = time.perf_counter()
    built = build_index(work / "pairs.parquet", work / "img", work / "index", seed=args.seed,
                               device=args.device)
    build_seconds = time.perf_counter() - t0
    print(f"index build  {build_seconds:7.1f} s  {built.text()}")
    t0 = time.perf_counter()
    done = generate_phrases(work / "index", work / "img", work / "phrases", k=3, device=args.device)
    seconds = time.perf_counter() - t0
    print(f"phrases      {seconds:7.1f} s  {args.images / seconds:,.0f} images/s; {done.text()}")
    write_json(args.json, {"device": args.device, "images": args.images, "prototypes": args.prototypes,
                           "dim": args.dim, "index_build_seconds": round(build_seconds, 2),
                           "index": built.index["factory"], "recall_at_10": built.index["recall_at_10"],
                           "phrases_seconds": round(seconds, 2), "phrases_rows_per_second": round(args.images / seconds, 1)})
    print(f"(work folder {work}; remove it when done)")


SCALE_IMAGES, SCALE_QUERIES, SCALE_PAIRS, SCALE_DIM = 2_000_000, 1_000_000, 20_000_000, 256
PARAPHRASES = 10  # queries per group: a group's queries pair with the images around one centre
OFF_GROUP = 0.1  # share of a query's pairs on a random image of another group (noise)


def generate_scale_corpus(work: Path, images: int, queries: int, pairs: int, dim: int, seed: int) -> None:
    """work/img (float16 store, shards of 100,000) and work/pairs/part-NNN.parquet, a chunk at a time:
    images around PARAPHRASES-query group centres; each query's pairs on its group's images."""
    import pyarrow as pa

    from phrasefuse.folders import write_parquet_atomic
    from phrasefuse.store import StoreWriter, new_meta

    rng = np.random.default_rng(seed)
    groups = max(1, queries // PARAPHRASES)
    centres = random_unit(rng, groups, dim, None, 0)
    per_group = max(1, images // groups)
    image_ids = pa.array(np.char.add("i", np.char.zfill(np.arange(images).astype(str), 9)))
    query_names = pa.array(np.char.add("query ", np.arange(queries).astype(str)))
    encoder = {"spec": f"random:{dim}", "family": "random", "name": f"clustered-{dim}",
               "weights_sha256": "0" * 64, "dim": dim}
    meta = new_meta(modality="image", encoder=encoder, dtype="float16", source={"manifest": "generated", "column": "image"})
    chunk = 100_000
    with StoreWriter.open(work / "img", meta, shard_size=chunk) as writer:
        for start in range(0, images, chunk):
            m = min(chunk, images - start)
            group = np.minimum(np.arange(start, start + m) // per_group, groups - 1)
            x = rng.standard_normal((m, dim), dtype=np.float32) * (0.7 / np.sqrt(dim))
            x += centres[group]
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            ids = image_ids.slice(start, m)
            writer.add(ids, ids, x)
    (work / "pairs").mkdir()
    per_query = max(1, pairs // queries)
    rows_per_file = 2_000_000
    for part, start in enumerate(range(0, pairs, rows_per_file)):
        m = min(rows_per_file, pairs - start)
        query = (np.arange(start, start + m) // per_query) % queries
        group = np.minimum(query // PARAPHRASES, groups - 1)
        image = np.minimum(group * per_group + rng.integers(0, per_group, m), images - 1)
        noise = rng.random(m) < OFF_GROUP
        image[noise] = rng.integers(0, images, int(noise.sum()))
        write_parquet_atomic(work / "pairs" / f"part-{part:03d}.parquet",
                             pa.table({"query": query_names.take(pa.array(query)),
                                       "image_id": image_ids.take(pa.array(image))}))


def bench_scale(args: argparse.Namespace) -> None:
    """A streaming `index build` in a fresh process on a generated corpus: wall time, peak RSS, recall@10."""
    import shutil
    import subprocess

    from phrasefuse.index.streaming import PAIR, PAIR_COPIES, SUMS_SHARE

    f = args.fraction
    images, queries, pairs = int(SCALE_IMAGES * f), int(SCALE_QUERIES * f), int(SCALE_PAIRS * f)
    dim = args.dim if args.dim != 512 else SCALE_DIM  # --dim's default is the other benches'
    memory = args.memory or "2G"
    work = Path(args.work or Path(tempfile.gettempdir()) / "phrasefuse-bench-scale") / f"scale-{f:g}"
    if not (work / "img" / "meta.json").exists() or not (work / "pairs").is_dir():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t0 = time.perf_counter()
        generate_scale_corpus(work, images, queries, pairs, dim, args.seed)
        print(f"generated {images:,} x {dim} float16 image store and {pairs:,} pairs over {queries:,} queries "
              f"in {time.perf_counter() - t0:.0f} s -> {work}")
    shutil.rmtree(work / "index", ignore_errors=True)
    command = [sys.executable, "-m", "phrasefuse", "index", "build", "--pairs", str(work / "pairs" / "*.parquet"),
               "--images", str(work / "img"), "--out", str(work / "index"), "--memory", memory,
               "--engine", args.engine, "--seed", str(args.seed), "--json"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    out, err = proc.communicate()  # ru_maxrss of the child: waited for here, read below
    seconds = time.perf_counter() - t0
    import resource

    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if proc.returncode != 0:
        raise SystemExit(f"index build failed ({proc.returncode}): {err.strip()[-2000:]}")
    summary = json.loads(out)
    ix = summary["index"]
    budget = parse_memory(memory)
    print(f"index build --memory {memory} --engine {args.engine}: {images:,} images x {dim}, {pairs:,} pairs, "
          f"{queries:,} queries: {seconds:.0f} s, peak RSS {human_bytes(peak)} (goal: < 3 GiB at --memory 2G)")
    setting = f" {ix['search_param']}={ix['search_value']}" if ix.get("search_param") else ""
    print(f"  {summary['counts']['phrases']:,} phrases; {ix['factory']}{setting} ({human_bytes(ix['bytes'])}); recall@10 {ix['recall_at_10']:.3f} on "
          f"{ix['recall_queries']} held-out image embeddings; " + "; ".join(summary["notes"]))
    print(f"  budget shares: one partition's sums <= {SUMS_SHARE:g} x --memory ({human_bytes(budget * SUMS_SHARE)}), "
          f"its pairs <= the same ({PAIR.itemsize} B x {PAIR_COPIES} copies per pair); index <= --memory")
    write_json(args.json, {"device": args.device, "engine": args.engine, "images": images, "queries": queries,
                           "pairs": pairs, "dim": dim, "memory": memory, "seconds": round(seconds, 1),
                           "peak_rss_bytes": peak, "index": ix["factory"], "recall_at_10": ix["recall_at_10"],
                           "notes": summary["notes"]})
    if args.results:
        row = {"corpus": f"{images:,} images, {pairs / 1e6:g} M pairs, {queries:,} queries"
                         + (f" (--fraction {f:g})" if f != 1 else ""),
               "memory": memory, "partitions": partitions_of(summary["notes"]), "index": f"{ix['factory']}{setting}",
               "recall": ix["recall_at_10"], "seconds": round(seconds), "rss_gib": round(peak / 2**30, 2),
               "rss_gb": round(peak / 1e9, 2)}
        add_scale_row(args.results, row)


def partitions_of(notes: list[str]) -> int:
    """The query partitions of a build, from its summary's notes (a note only when more than one)."""
    import re

    found = [re.search(r"summed in (\d+) query partitions", n) for n in notes]
    return next((int(m.group(1)) for m in found if m), 1)


def add_scale_row(path: Path, row: dict) -> None:
    """Append one --scale run to a bench/tables.py result file, stamping command, date and machine."""
    import platform

    result = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {
        "title": "index build at scale",
        "data": "a generated float16 store and pairs table; the build in a fresh process, its wall time and peak RSS",
        "columns": [["corpus", "{corpus}"], ["--memory", "{memory}"], ["partitions", "{partitions}"],
                    ["index chosen", "{index}"], ["recall@10", "{recall:.3f}"], ["time", "{seconds:.0f} s"],
                    ["peak RSS", "{rss_gib:.2f} GiB ({rss_gb:.2f} GB)"]],
        "rows": []}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    result.update({"command": ".venv/bin/python bench/index.py " + " ".join(sys.argv[1:]),
                   "date": time.strftime("%Y-%m-%d", time.gmtime()),
                   "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()}), "
                              f"load average {load:.1f} at the end"})
    result["rows"].append(row)
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
