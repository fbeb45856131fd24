"""Retrieval metrics: Recall@K (hit rate), P@1, R-precision, MAP@R.

Definitions (docs/metrics.md has the glossary).  For a query q with label y,
the *relevant* items are the gallery items with label y, q itself excluded by
index in self mode; R = their number.  Queries with R = 0 are excluded (and
counted).  Neighbours are ranked by similarity, ties by lower gallery index
(docs/reference.md §7, MATLAB's stable sort).

- Recall@K = fraction of queries with at least one relevant item among the K
  nearest (the DML hit rate of evaluate_recall.m, §7 step 5).
- P@1 = fraction whose nearest neighbour is relevant (= Recall@1).
- R-precision = (relevant among the R nearest) / R.
- MAP@R = (1/R) sum_{i=1..R} P(i) rel(i), P(i) = precision at rank i
  (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020, §3.2).

Recall@K for any K uses the exact 1-based rank of the first relevant item
(counted on device, knn.py), so Recall@1000 costs no top-1000 list; MAP@R and
R-precision use a top-k list with k = the largest R.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deml_jax.evaluation import knn as knn_lib

# Recall@K sets of the zero-shot benchmarks (docs/reference.md §14.3, §7).
RECALL_KS = {
    "cub200": (1, 2, 4, 8),
    "cars196": (1, 2, 4, 8),
    "sop": (1, 10, 100, 1000),
    "inshop": (1, 10, 20, 30, 40, 50),
}


@jax.jit
def ranked_list_stats(hits: jax.Array, num_relevant: jax.Array) -> tuple[jax.Array, jax.Array]:
    """AP@R and R-precision of each query from its ranked hit list.

    Args:
      hits: bool [Q, K], hits[q, i] = the (i+1)-th nearest item is relevant;
        K must be >= num_relevant[q] for the result to be exact.
      num_relevant: int [Q], R per query.
    Returns:
      (ap_at_r float32 [Q], r_precision float32 [Q]); 0 where R == 0.
    """
    rank = jnp.arange(1, hits.shape[1] + 1)
    r = num_relevant[:, None]
    rel = hits & (rank[None, :] <= r)
    cum = jnp.cumsum(rel, axis=1)
    denom = jnp.maximum(num_relevant, 1).astype(jnp.float32)
    ap = jnp.sum(jnp.where(rel, cum / rank[None, :], 0.0), axis=1) / denom
    return ap, cum[:, -1] / denom


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return tuple(int(k) for k in ks)


def max_relevant(query_labels: np.ndarray, gallery_labels: np.ndarray | None) -> int:
    """Largest R over the queries (self mode when gallery_labels is None)."""
    if gallery_labels is None:
        _, counts = np.unique(query_labels, return_counts=True)
        return int(counts.max()) - 1
    uniq, counts = np.unique(gallery_labels, return_counts=True)
    present = np.isin(uniq, query_labels)
    return int(counts[present].max()) if present.any() else 0


class DegenerateEvaluationError(ValueError):
    """The split cannot be evaluated: fewer than 2 classes, or no query has a
    relevant item (every metric would be a meaningless 1.0 or NaN)."""


def count_valid_queries(query_labels, gallery_labels=None) -> int:
    """Queries with at least one relevant gallery item (self mode: another
    item of the same label), i.e. the ``num_queries`` the metrics average over."""
    q = np.asarray(query_labels)
    if gallery_labels is None:
        uniq, inv, counts = np.unique(q, return_inverse=True, return_counts=True)
        return int(np.sum(counts[inv] > 1))
    return int(np.sum(np.isin(q, np.asarray(gallery_labels))))


def check_evaluable(query_labels, gallery_labels=None, *, what: str = "the evaluation set"
                    ) -> None:
    """Raises :class:`DegenerateEvaluationError` when the metrics mean nothing.

    Fewer than 2 classes (in the gallery, or the self set) makes every
    retrieval and clustering metric 1.0; no query with a relevant item makes
    Recall@K NaN.  The message says what was found.
    """
    q = np.asarray(query_labels)
    g = q if gallery_labels is None else np.asarray(gallery_labels)
    classes = np.unique(g)
    if classes.size < 2:
        raise DegenerateEvaluationError(
            f"{what} has {classes.size} class(es) ({g.size} items, labels "
            f"{classes[:5].tolist()}): retrieval needs at least 2 classes")
    valid = count_valid_queries(q, gallery_labels)
    if valid == 0:
        why = ("every label occurs once, so no query has another item of its class"
               if gallery_labels is None else "no query label occurs in the gallery")
        raise DegenerateEvaluationError(
            f"{what}: 0 of {q.size} queries have a relevant item ({why}); "
            "Recall@K would be NaN")


def _int_labels(labels, n: int, name: str) -> np.ndarray:
    if labels is None:
        raise ValueError(f"{name} is required")
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array of shape ({n},), "
                         f"got {labels.dtype} {labels.shape}")
    return labels


def retrieval_metrics(query, query_labels, gallery=None, gallery_labels=None,
                      ks: Sequence[int] = (1, 2, 4, 8), metric: str = "cosine",
                      chunk_size: int = knn_lib.DEFAULT_CHUNK_SIZE, *, map_at_r: bool = True,
                      devices=None, shard_threshold: int = knn_lib.DEFAULT_SHARD_THRESHOLD,
                      return_per_query: bool = False) -> dict:
    """Exact retrieval metrics, chunked (and sharded) k-NN on device.

    Args:
      query: float [Q, D]; query_labels: int [Q].
      gallery, gallery_labels: float [N, D], int [N]; None = the query set is
        its own gallery, each query's own entry excluded by index.
      ks: Recall@K cut-offs (RECALL_KS has the benchmarks' sets).
      metric: 'cosine' or 'euclidean'.
      chunk_size: query rows per chunk; peak memory O(chunk_size x N).
      map_at_r: also compute 'r_precision' and 'map@r' (top-k list, k = max R).
      devices, shard_threshold: see knn.knn_search.
      return_per_query: add 'per_query' (dict of numpy [Q] arrays).
    Returns:
      {'recall@K': float, ..., 'p@1', 'r_precision', 'map@r' (float, over the
      included queries), 'num_queries' (int, included), 'num_excluded_queries'
      (int, queries with R = 0), 'metric' (str)}.
    Raises:
      DegenerateEvaluationError: fewer than 2 gallery classes, or no query
        with a relevant item.
    """
    ks = _check_ks(ks)
    knn_lib.check_metric(metric)
    n_q = np.shape(query)[0] if np.ndim(query) == 2 else -1
    q_lab = _int_labels(query_labels, n_q, "query_labels")
    g_lab = None
    if gallery is not None:
        g_lab = _int_labels(gallery_labels, np.shape(gallery)[0], "gallery_labels")
    elif gallery_labels is not None:
        raise ValueError("gallery_labels given without gallery")
    check_evaluable(q_lab, g_lab)
    k = max(1, max_relevant(q_lab, g_lab)) if map_at_r else 1
    nn = knn_lib.knn_search(query, gallery, k=k, metric=metric, query_labels=q_lab,
                            gallery_labels=g_lab, chunk_size=chunk_size, devices=devices,
                            shard_threshold=shard_threshold)
    return summarize(nn, q_lab, ks, metric=metric, map_at_r=map_at_r,
                     return_per_query=return_per_query)


def summarize(nn: dict, query_labels: np.ndarray, ks: Sequence[int], *, metric: str,
              map_at_r: bool = True, return_per_query: bool = False) -> dict:
    """Averages the per-query statistics of knn.knn_search over included queries."""
    rank, num_rel = nn["first_hit_rank"], nn["num_relevant"]
    included = num_rel > 0
    n_inc = int(included.sum())
    out: dict = {}
    mean = (lambda v: float(np.mean(v[included], dtype=np.float64)) if n_inc else float("nan"))
    for k in ks:
        out[f"recall@{k}"] = mean((rank >= 1) & (rank <= k))
    out["p@1"] = mean(rank == 1)
    per_query = {"first_hit_rank": rank, "num_relevant": num_rel}
    if map_at_r:
        hits = (nn["labels"] == query_labels[:, None]) & (nn["indices"] >= 0)
        ap, rp = (np.asarray(a) for a in ranked_list_stats(jnp.asarray(hits),
                                                             jnp.asarray(num_rel)))
        out["r_precision"], out["map@r"] = mean(rp), mean(ap)
        per_query.update(ap_at_r=ap, r_precision=rp)
    out["num_queries"] = n_inc
    out["num_excluded_queries"] = int(rank.shape[0] - n_inc)
    out["metric"] = metric
    if return_per_query:
        out["per_query"] = per_query
    return out
