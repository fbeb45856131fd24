"""Clustering quality: k-means on device, then NMI and pairwise F1 (exact, host).

The released code has no NMI (docs/reference.md §7, last bullet); these are the
metric-learning literature's standard clustering scores: k-means with as many
clusters as test classes, NMI = I(Y; C) / mean(H(Y), H(C)) (scikit-learn's
default 'arithmetic' normalisation), and the pairwise F1 over same-cluster
pairs (Song et al., "Deep Metric Learning via Lifted Structured Feature
Embedding", CVPR 2016).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from deml_jax.evaluation import knn as knn_lib

# Lloyd iterations stop when no assignment changes or after this many
# (scikit-learn's KMeans allows 300; 100 suffices on the test splits).
DEFAULT_MAX_ITERS = 100
# Points per chunk of the assignment step: [chunk, num_clusters] distances.
DEFAULT_KMEANS_CHUNK = 4096
_HI = lax.Precision.HIGHEST


def _kmeans_pp(x, x_sq, k, key):
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; scikit-learn's
    variant): each step draws 2 + floor(ln k) candidates by D^2 sampling and
    keeps the one that lowers the potential most (plain k-means++ often puts
    two seeds in one well-separated blob)."""
    trials = 2 + int(np.log(k))
    key, sub = jax.random.split(key)
    first = jax.random.randint(sub, (), 0, x.shape[0])

    def d2_to(c):  # c [m, D] -> [m, N]
        cross = jnp.dot(c, x.T, precision=_HI)
        return jnp.maximum(x_sq[None] - 2.0 * cross + jnp.sum(c * c, 1)[:, None], 0.0)

    centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])

    def body(i, carry):
        centers, d2, key = carry
        key, sub = jax.random.split(key)
        # All-zero d2 (fewer distinct points than k): fall back to uniform.
        logits = jnp.where(jnp.sum(d2) > 0, jnp.log(d2), 0.0)
        cand = jax.random.categorical(sub, logits, shape=(trials,))
        new_d2 = jnp.minimum(d2[None], d2_to(x[cand]))
        best = jnp.argmin(jnp.sum(new_d2, axis=1))
        return centers.at[i].set(x[cand[best]]), new_d2[best], key

    centers, _, _ = lax.fori_loop(1, k, body, (centers, d2_to(x[first][None])[0], key))
    return centers


def _assign(xc, centers):
    """Nearest center of each point, chunked: xc [n_chunks, c, D] -> [n_chunks, c]."""
    c_sq = jnp.sum(centers * centers, axis=1)

    def one(x):  # |x|^2 is constant per row: dropped from the argmin
        d = c_sq[None, :] - 2.0 * jnp.dot(x, centers.T, precision=_HI)
        return jnp.argmin(d, axis=1).astype(jnp.int32)

    return lax.map(one, xc)


@functools.partial(jax.jit, static_argnames=("k", "max_iters", "chunk"))
def _kmeans(x, key, *, k, max_iters, chunk):
    """Seeded k-means++ then Lloyd until no assignment changes (or max_iters)."""
    n = x.shape[0]
    n_chunks = -(-n // chunk)
    xc = jnp.pad(x, ((0, n_chunks * chunk - n), (0, 0))).reshape(n_chunks, chunk, -1)
    centers = _kmeans_pp(x, jnp.sum(x * x, axis=1), k, key)

    def assign(centers):
        return _assign(xc, centers).reshape(-1)[:n]  # padded rows dropped

    def update(centers, labels):
        sums = jax.ops.segment_sum(x, labels, num_segments=k)
        counts = jax.ops.segment_sum(jnp.ones((n,), x.dtype), labels, num_segments=k)
        # An empty cluster keeps its previous center.
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centers)

    def cond(carry):
        _, _, it, changed = carry
        return (it < max_iters) & changed

    def body(carry):
        centers, labels, it, _ = carry
        centers = update(centers, labels)
        new = assign(centers)
        return centers, new, it + 1, jnp.any(new != labels)

    labels = assign(centers)
    centers, labels, it, _ = lax.while_loop(cond, body, (centers, labels, 0, True))
    return centers, labels, it


def kmeans(x, num_clusters: int, *, seed: int = 0, max_iters: int = DEFAULT_MAX_ITERS,
           chunk_size: int = DEFAULT_KMEANS_CHUNK) -> tuple[np.ndarray, np.ndarray, int]:
    """k-means on device, seeded from ``jax.random.PRNGKey(seed)``.

    Args:
      x: float [N, D] points; num_clusters: 1 <= k <= N.
      max_iters: Lloyd iterations at most (stops earlier when stable).
      chunk_size: points per assignment chunk (memory O(chunk_size x k)).
    Returns:
      (centers float32 [k, D], assignments int32 [N], Lloyd iterations run).
    """
    x = knn_lib.as_embedding_matrix(x, "x")
    if not isinstance(num_clusters, (int, np.integer)) or not 1 <= num_clusters <= x.shape[0]:
        raise ValueError(f"num_clusters must be an int in [1, {x.shape[0]}], got {num_clusters!r}")
    chunk = min(int(chunk_size), x.shape[0])
    centers, labels, it = _kmeans(jnp.asarray(x), jax.random.PRNGKey(seed), k=int(num_clusters),
                                  max_iters=int(max_iters), chunk=chunk)
    return np.asarray(centers), np.asarray(labels), int(it)


def _contingency(labels_true, labels_pred) -> np.ndarray:
    labels_true, labels_pred = np.asarray(labels_true), np.asarray(labels_pred)
    if labels_true.ndim != 1 or labels_true.shape != labels_pred.shape:
        raise ValueError("labels_true and labels_pred must be 1-D of the same length, got "
                         f"{labels_true.shape} and {labels_pred.shape}")
    _, t = np.unique(labels_true, return_inverse=True)
    _, p = np.unique(labels_pred, return_inverse=True)
    table = np.zeros((t.max() + 1, p.max() + 1), np.int64)
    np.add.at(table, (t, p), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log(p)))


def nmi(labels_true, labels_pred) -> float:
    """Normalised mutual information, I / ((H_true + H_pred) / 2), float64."""
    table = _contingency(labels_true, labels_pred)
    n = table.sum()
    h_t, h_p = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_t + h_p == 0.0:  # one class and one cluster: identical partitions
        return 1.0
    nz = table > 0
    outer = np.outer(table.sum(1), table.sum(0))[nz].astype(np.float64)
    mi = float(np.sum(table[nz] / n * (np.log(table[nz] * float(n)) - np.log(outer))))
    # Clipped: rounding can put a perfect clustering at 1 + 2e-16.
    return min(max(mi, 0.0) / ((h_t + h_p) / 2.0), 1.0)


def pairwise_f1(labels_true, labels_pred) -> float:
    """F1 of same-cluster pairs against same-class pairs (integer counts)."""
    table = _contingency(labels_true, labels_pred)
    pairs = lambda c: int(np.sum(c * (c - 1) // 2))
    tp, pred_pos, true_pos = pairs(table), pairs(table.sum(0)), pairs(table.sum(1))
    if tp == 0:
        return 0.0
    precision, recall = tp / pred_pos, tp / true_pos
    return 2.0 * precision * recall / (precision + recall)


def clustering_metrics(embeddings, labels, seed: int = 0, *, metric: str = "cosine",
                       max_iters: int = DEFAULT_MAX_ITERS,
                       chunk_size: int = DEFAULT_KMEANS_CHUNK) -> dict:
    """k-means with as many clusters as classes, then NMI and pairwise F1.

    Args:
      embeddings: float [N, D]; labels: int [N].
      metric: 'cosine' L2-normalises the rows first (the retrieval metric, §7).
    Returns:
      {'nmi': float, 'f1': float, 'num_clusters': int, 'kmeans_iters': int}.
    """
    knn_lib.check_metric(metric)
    x = knn_lib.as_embedding_matrix(embeddings, "embeddings")
    labels = np.asarray(labels)
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {labels.shape}")
    k = int(np.unique(labels).size)
    if k < 2:  # NMI and F1 would be a meaningless 1.0
        from deml_jax.evaluation.metrics import DegenerateEvaluationError
        raise DegenerateEvaluationError(
            f"clustering needs at least 2 classes, got {k} ({labels.size} items)")
    x, _ = knn_lib.prepare(x, metric)
    _, assign, it = kmeans(x, k, seed=seed, max_iters=max_iters, chunk_size=chunk_size)
    return {"nmi": nmi(labels, assign), "f1": pairwise_f1(labels, assign),
            "num_clusters": k, "kmeans_iters": it}
