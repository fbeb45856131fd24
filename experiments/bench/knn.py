"""Benchmark: exact retrieval metrics at CUB and SOP scale vs faiss IndexFlatIP.

Run:  .venv/bin/python experiments/bench/knn.py [--scales cub,sop] [--chunk_size 512]

Each (scale, method) runs in a fresh subprocess so that its peak RSS (getrusage
ru_maxrss, minus the peak before the measured call) is its own.  Methods:

- ``metrics``: deml_jax.evaluation.retrieval_metrics with the benchmark's
  Recall@K set and MAP@R (first call, compile included, then a warm call);
- ``knn``: deml_jax.evaluation.knn_search with k = max(ks) + 1 (the same k-NN
  list faiss computes);
- ``faiss``: faiss.IndexFlatIP on L2-normalised float32, search k = max(ks) + 1
  (self included, dropped afterwards), exact.  faiss is optional.

Data: synthetic 504-d embeddings (class centre + noise, L2-normalised), CUB:
5,924 images / 100 classes; SOP: 60,502 images / 11,316 classes of 2..12.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

SCALES = {  # (num images, num classes or None for SOP-like sizes, Recall@K set)
    "cub": (5924, 100, (1, 2, 4, 8)),
    "sop": (60502, None, (1, 10, 100, 1000)),
}
DIM = 504  # DeML(I=3, J=3) inference embedding: 9 x 56 (docs/reference.md §0)
NOISE = 3.5  # per-dim noise vs unit-variance class centres: R@1 ~ 0.6 at CUB scale
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def make_data(scale: str, seed: int = 0, n: int | None = None):
    """Synthetic L2-normalised embeddings and labels (``n`` overrides the scale's size)."""
    n_default, n_cls, _ = SCALES[scale]
    n = n or n_default
    rng = np.random.default_rng(seed)
    if n_cls is None:  # SOP: classes of 2..12 images
        sizes = []
        while sum(sizes) < n:
            sizes.append(int(rng.integers(2, 13)))
        sizes[-1] -= sum(sizes) - n
        if sizes[-1] < 2:
            sizes[-2] += sizes.pop()
        labels = np.repeat(np.arange(len(sizes)), sizes)
    else:
        labels = np.sort(rng.integers(0, n_cls, n))
    centres = rng.standard_normal((labels.max() + 1, DIM)).astype(np.float32)
    x = centres[labels] + NOISE * rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(fn):
    """(result, seconds, peak RSS increase in MB during the call).

    A thread samples the resident set every 2 ms (getrusage's ru_maxrss is a
    process-lifetime maximum, useless once an earlier phase peaked higher)."""
    base, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    res = fn()
    dt = time.perf_counter() - t
    done.set()
    th.join()
    return res, dt, max(peak[0], _rss_mb()) - base


def _device_peak_mb():
    try:
        import jax
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use", 0) / 2**20 or None
    except Exception:  # noqa: BLE001 - memory_stats is backend-dependent
        return None


def run_one(scale: str, method: str, chunk_size: int) -> dict:
    x, labels = make_data(scale)
    ks = SCALES[scale][2]
    out: dict = {"scale": scale, "method": method, "n": len(x)}
    if method == "faiss":
        import faiss

        def call():
            index = faiss.IndexFlatIP(DIM)
            index.add(x)
            return index.search(x, max(ks) + 1)[1]

        idx, out["time_s"], out["rss_mb"] = timed(call)
        nn = np.stack([row[row != i][: max(ks)] for i, row in enumerate(idx)])
        out["recall@1"] = float(np.mean(labels[nn[:, 0]] == labels))
        return out
    import jax
    from deml_jax.evaluation import knn_search, retrieval_metrics
    dev = jax.devices()[:1]
    jax.numpy.zeros(1).block_until_ready()  # backend up before the baseline
    if method == "metrics":
        call = lambda: retrieval_metrics(x, labels, ks=ks, chunk_size=chunk_size, devices=dev)
    else:
        call = lambda: knn_search(x, k=max(ks) + 1, query_labels=labels, chunk_size=chunk_size,
                                  devices=dev)
    res, out["time_s"], out["rss_mb"] = timed(call)  # first call: compile included
    if scale == "cub":  # warm call (same shapes: no compile)
        _, out["warm_time_s"], out["warm_rss_mb"] = timed(call)
    if method == "metrics":
        out.update({k: v for k, v in res.items() if k != "metric"})
    else:
        out["recall@1"] = float(np.mean(res["first_hit_rank"] == 1))
    out["device_peak_mb"] = _device_peak_mb()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scales", default="cub,sop")
    p.add_argument("--methods", default="metrics,knn,faiss")
    p.add_argument("--chunk_size", "--chunk-size", type=int, default=512,
                   help="query rows per chunk")
    p.add_argument("--one", nargs=2, metavar=("SCALE", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.chunk_size)))
        return
    rows = []
    for scale in args.scales.split(","):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--one", scale, method,
                   "--chunk_size", str(args.chunk_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if proc.returncode:
                print(f"{scale}/{method} failed:\n{proc.stderr[-2000:]}")
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    _table(rows)


def _table(rows) -> None:
    import jax
    print(f"\ndevice: {jax.devices()[0].device_kind}, cpus: {os.cpu_count()}")
    print(f"{'scale':5} {'method':8} {'N':>6} {'time s':>8} {'warm s':>7} {'RSS+ MB':>8} "
          f"{'warm RSS+':>9} {'NxN MB':>8} {'ours/faiss':>10}  recall@1 / map@r")
    faiss_t = {r["scale"]: r["time_s"] for r in rows if r["method"] == "faiss"}
    # ratio: warm time where measured (compile excluded), else the first call
    for r in rows:
        nxn = r["n"] ** 2 * 4 / 2**20
        ratio = (f"{r.get('warm_time_s', r['time_s']) / faiss_t[r['scale']]:.2f}"
                 if r["method"] != "faiss" and r["scale"] in faiss_t else "-")
        warm = f"{r['warm_time_s']:.2f}" if "warm_time_s" in r else "-"
        warm_rss = f"{r['warm_rss_mb']:.0f}" if "warm_rss_mb" in r else "-"
        print(f"{r['scale']:5} {r['method']:8} {r['n']:6d} {r['time_s']:8.2f} {warm:>7} "
              f"{r['rss_mb']:8.0f} {warm_rss:>9} {nxn:8.0f} {ratio:>10}  "
              f"{r.get('recall@1', float('nan')):.4f} / {r.get('map@r', float('nan')):.4f}")


if __name__ == "__main__":
    main()
