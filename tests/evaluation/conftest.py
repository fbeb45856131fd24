"""Shared references for the evaluation tests: brute force with a full argsort.

Written independently of deml_jax.evaluation: float64 NumPy, the whole
similarity matrix, ``np.argsort(kind='stable')`` (ties -> lower gallery index,
docs/reference.md §7) and plain Python loops for the metrics.
"""
import types

import numpy as np
import pytest


def brute_force_rankings(query, gallery=None, metric="cosine"):
    """Per query: the gallery indices sorted nearest first (self removed)."""
    q = np.asarray(query, np.float64)
    g = q if gallery is None else np.asarray(gallery, np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        sim = q @ g.T
    else:
        sim = -((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    orders = []
    for i in range(q.shape[0]):
        order = np.argsort(-sim[i], kind="stable")
        if gallery is None:
            order = order[order != i]
        orders.append(order)
    return orders


def brute_force_metrics(query, query_labels, gallery=None, gallery_labels=None, ks=(1,),
                        metric="cosine"):
    g_lab = np.asarray(query_labels if gallery is None else gallery_labels)
    out = {f"recall@{k}": [] for k in ks}
    out.update({"p@1": [], "r_precision": [], "map@r": []})
    excluded = 0
    for i, order in enumerate(brute_force_rankings(query, gallery, metric)):
        rel = [bool(g_lab[j] == query_labels[i]) for j in order]
        r = sum(rel)
        if r == 0:
            excluded += 1
            continue
        for k in ks:
            out[f"recall@{k}"].append(float(any(rel[:k])))
        out["p@1"].append(float(rel[0]))
        out["r_precision"].append(sum(rel[:r]) / r)
        hits, ap = 0, 0.0
        for pos in range(r):
            if rel[pos]:
                hits += 1
                ap += hits / (pos + 1)
        out["map@r"].append(ap / r)
    res = {name: float(np.mean(v)) for name, v in out.items()}
    res["num_queries"] = len(query_labels) - excluded
    res["num_excluded_queries"] = excluded
    return res


def tie_heavy(rng, n, dim=8, nnz=4):
    """Vectors with exactly ``nnz`` entries of +-1 (nnz = 1, 4, 16: the norm is a
    power of two, so L2 normalisation is exact): cosine scores are exact
    multiples of 1/nnz in float32, so many exact ties (and duplicates)."""
    x = np.zeros((n, dim), np.float32)
    for i in range(n):
        idx = rng.choice(dim, nnz, replace=False)
        x[i, idx] = rng.choice([-1.0, 1.0], nnz)
    return x


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def refs():
    """The brute-force references, as a fixture (no test-module imports)."""
    return types.SimpleNamespace(rankings=brute_force_rankings, metrics=brute_force_metrics,
                                 tie_heavy=tie_heavy)
