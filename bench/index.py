"""Benchmark: the prototype index's automatic FAISS choice against exact search (not a test).

On random unit vectors (default: 1,000,000 prototypes of dim 512), in one run:
  exact   faiss.IndexFlatIP: build time, search throughput on one batch of 10,000 queries;
          its results are the ground truth;
  auto    what `phrasefuse index build` would choose (phrasefuse.index.ann.build_index: kind
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
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phrasefuse.index.ann import (build_index, exact_search, faiss_threads, human_bytes, parse_memory,  # noqa: E402
                                  recall_at_k, search)


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
    args = parser.parse_args()

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

    flat = faiss.IndexFlatIP(args.dim)
    flat.add(vectors)
    exact_build = time.perf_counter() - t0
    exact_scores, _, exact_seconds = exact_search(vectors, queries, 10)
    exact_qps = args.queries / exact_seconds
    print(f"exact  Flat: build {exact_build:6.1f} s | search {exact_qps:9,.0f} queries/s "
          f"(batch {args.queries:,}, {exact_seconds:.1f} s) | recall@10 1.000")

    t0 = time.perf_counter()
    index, report = build_index(vectors, tuning, kind=args.kind, memory=parse_memory(args.memory), seed=args.seed)
    build_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, found = search(index, queries, 10)
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


if __name__ == "__main__":
    main()
