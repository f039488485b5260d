"""The gallery index's ITC stage at scale: FAISS over synthetic ITC vectors, as `xvlm.index.VectorSearch` builds it.

    python benchmarks/ann.py [--n 1000000] [--dim 256] [--centres 10000] [--queries 500] [--threads 2]
                             [--nprobe 16,32,64,128] [--markdown benchmarks/RESULTS.md]

Data: N x D L2-normalised vectors. `clustered`: 10k Gaussian centres on the sphere, each vector a centre plus
isotropic noise of norm ~0.5 (cosine to its centre ~0.9), as real embeddings cluster by content; `uniform`: uniform
on the sphere (no structure: the hard case for any inverted-file index). Queries: database vectors plus noise of norm
~0.1, searched one at a time (batch 1). Reported per data set: the IVF build time (train + add), resident memory of
the data and of the index, p50 / p95 latency of batch-1 queries and recall@10 against exact inner-product search
(FAISS IndexFlatIP, whose own batch-1 latency is the baseline row), for each nprobe.
Targets (issue #25): p50 <= 20 ms and recall@10 >= 0.95 on 2 cores for the clustered data.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from xvlm.index import VectorSearch  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_data(kind: str, n: int, d: int, centres: int, rng) -> np.ndarray:
    if kind == "uniform":
        return normalise(rng.standard_normal((n, d), dtype=np.float32))
    c = normalise(rng.standard_normal((centres, d), dtype=np.float32))
    x = np.empty((n, d), np.float32)
    step = 100_000
    for s in range(0, n, step):
        m = min(step, n - s)
        x[s:s + m] = c[rng.integers(0, centres, m)] + 0.5 / np.sqrt(d) * rng.standard_normal((m, d), dtype=np.float32)
    return normalise(x)


def latencies(index, queries: np.ndarray, k: int) -> np.ndarray:
    out = np.empty(len(queries))
    for i, q in enumerate(queries):
        t = time.perf_counter()
        index.search(q[None], k)
        out[i] = time.perf_counter() - t
    return out * 1e3


def run(kind: str, a, rng) -> list[dict]:
    import faiss

    base = rss_mb()
    t = time.perf_counter()
    x = make_data(kind, a.n, a.dim, a.centres, rng)
    gen_s = time.perf_counter() - t
    data_mb = rss_mb() - base
    picks = rng.choice(a.n, a.queries, replace=False)
    q = normalise(x[picks] + 0.1 / np.sqrt(a.dim) * rng.standard_normal((a.queries, a.dim), dtype=np.float32))
    exact = faiss.IndexFlatIP(a.dim)
    exact.add(x)
    t = time.perf_counter()
    _, truth = exact.search(q, a.k)
    exact_batch_s = time.perf_counter() - t
    before = rss_mb()
    t = time.perf_counter()
    vs = VectorSearch(x, exact_max=0)                 # the index's own approximate path (IVF)
    build_s = time.perf_counter() - t
    index_mb = rss_mb() - before
    rows = []
    flat_ms = latencies(exact, q[: min(50, a.queries)], a.k)
    rows.append({"data": kind, "index": "exact (IndexFlatIP)", "build_s": 0.0, "index_mb": data_mb,
                 "p50_ms": np.percentile(flat_ms, 50), "p95_ms": np.percentile(flat_ms, 95), "recall@10": 1.0})
    for nprobe in a.nprobe:
        vs.index.nprobe = nprobe
        ms = latencies(vs.index, q, a.k)
        _, got = vs.index.search(q, a.k)
        recall = float(np.mean([len(set(t_) & set(g_)) / a.k for t_, g_ in zip(truth, got)]))
        rows.append({"data": kind, "index": f"IVF{vs.index.nlist},Flat nprobe={nprobe}", "build_s": build_s,
                     "index_mb": index_mb, "p50_ms": np.percentile(ms, 50), "p95_ms": np.percentile(ms, 95),
                     "recall@10": recall})
    print(f"[{kind}] data generated in {gen_s:.0f} s ({data_mb:.0f} MB); exact ground truth for {a.queries} "
          f"queries in {exact_batch_s:.1f} s", file=sys.stderr)
    del exact, vs, x
    return rows


def table(rows: list[dict], a) -> str:
    head = (f"N={a.n:,} x D={a.dim}, {a.queries} batch-1 queries, faiss {__import__('faiss').__version__}, "
            f"{a.threads} threads, {platform.processor() or platform.machine()}")
    lines = [head, "", "| data | index | build (s) | memory (MB) | p50 (ms) | p95 (ms) | recall@10 vs exact |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['index']} | {r['build_s']:.1f} | {r['index_mb']:.0f} | {r['p50_ms']:.2f} "
                     f"| {r['p95_ms']:.2f} | {r['recall@10']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--centres", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nprobe", default="16,32,64,128")
    p.add_argument("--data", default="clustered,uniform")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.nprobe = [int(v) for v in a.nprobe.split(",")]
    import faiss

    faiss.omp_set_num_threads(a.threads)
    rng = np.random.default_rng(a.seed)
    rows = []
    for kind in a.data.split(","):
        rows += run(kind, a, rng)
        print(table(rows, a), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
