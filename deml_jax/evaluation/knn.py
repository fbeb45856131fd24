"""Exact, chunked, optionally gallery-sharded k-nearest-neighbour search.

The query set is cut into chunks of ``chunk_size`` rows; each chunk is scored
against the whole gallery with one matmul, so peak memory is O(chunk x N) and
the N x N similarity matrix never exists.  When several devices are available
and the gallery is large, the gallery is sharded over a 1-D ``('data',)`` mesh:
each device ranks its own slice and the per-device results are merged with
collectives (all-gather of local top-k lists, ``pmax``/``pmin``/``psum`` of
the per-query first-hit statistics).

Tie rule (docs/reference.md §7, MATLAB's stable ``sort`` in
``evaluate_recall.m``): gallery items with *equal* similarity are ranked by
gallery index, lower index first.  ``lax.top_k`` is index-stable on CPU (checked
in ``tests/evaluation/test_knn.py``); the merged candidate lists are re-sorted
on the key (-score, index), and the first-hit rank used for Recall@K is
counted with the explicit rule, so it is exact on any backend.

Scores are "higher is nearer": cosine similarity of L2-normalised vectors
(``metric='cosine'``, the released evaluation, §7 step 2-3), or
``2 q.g - |g|^2 = |q|^2 - |q - g|^2`` (``metric='euclidean'``, the same order
as the Euclidean distance; the per-query constant ``|q|^2`` is dropped).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

METRICS = ("cosine", "euclidean")
# Default query rows per chunk: 512 x 60,502 float32 scores = 124 MB at SOP
# scale (the full matrix would be 14.6 GB); on CPU 256..1024 ran equally fast
# (experiments/bench/knn.py), smaller chunks use less memory.
DEFAULT_CHUNK_SIZE = 512
# Shard the gallery over devices only when it is at least this large; below
# it one device is faster than the collectives (an engineering choice).
DEFAULT_SHARD_THRESHOLD = 32768
# Matmul precision: exact float32 products; TF32/bf16 passes would reorder
# near-ties on accelerators.
DEFAULT_PRECISION = lax.Precision.HIGHEST
_AXIS = "data"


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def as_embedding_matrix(x: Any, name: str) -> np.ndarray:
    """Validates a float [N, D] host array with finite entries; returns float32."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise TypeError(f"{name} must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def prepare(x: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (vectors to dot, squared norms) for ``metric``.

    Args:
      x: float32 [N, D].
    Returns:
      (float32 [N, D], float32 [N]); cosine L2-normalises the rows (§7 step 2).
    """
    if metric == "cosine":
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.maximum(norm, np.float32(1e-12))
    return x.astype(np.float32), np.sum(x * x, axis=1).astype(np.float32)


def _scores(q, g, g_sq, metric, precision):
    """[c, D] x [n, D] -> [c, n] float32, higher = nearer."""
    dots = lax.dot_general(q, g, (((1,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)
    if metric == "cosine":
        return dots
    return 2.0 * dots - g_sq[None, :]


def _local_top_k(s, lab, ids, k):
    """Top-k of the local slice; pads with (-inf, -1) when the slice has < k items."""
    kk = min(k, s.shape[1])
    vals, pos = lax.top_k(s, kk)
    # -inf = ineligible (self, padding): finite inputs give finite scores.
    gone = jnp.isneginf(vals)
    out_ids, out_lab = jnp.where(gone, -1, ids[pos]), jnp.where(gone, -1, lab[pos])
    if kk < k:
        pad = ((0, 0), (0, k - kk))
        vals = jnp.pad(vals, pad, constant_values=-jnp.inf)
        out_ids = jnp.pad(out_ids, pad, constant_values=-1)
        out_lab = jnp.pad(out_lab, pad, constant_values=-1)
    return vals, out_ids, out_lab


def _merge_top_k(vals, ids, lab, k):
    """Sorts candidates by (-score, gallery index) and keeps k: the tie rule."""
    big = jnp.iinfo(jnp.int32).max
    key_ids = jnp.where(ids < 0, big, ids)  # padding sorts last among -inf
    neg, key_ids, lab = lax.sort((-vals, key_ids, lab), dimension=1, num_keys=2)
    ids = jnp.where(key_ids == big, -1, key_ids)
    return -neg[:, :k], ids[:, :k], lab[:, :k]


def _chunk_neighbours(qc, g, g_sq, g_lab, g_ids, g_valid, *, metric, k, self_mode,
                      axis_name, precision):
    """Ranks one query chunk against the (local slice of the) gallery.

    Args:
      qc: (q float32 [c, D], q_lab int32 [c], q_ids int32 [c]) query chunk with
        the queries' own positions in the split (used for self exclusion).
      g, g_sq, g_lab, g_ids, g_valid: gallery slice [n, D], [n], [n], [n] (global
        positions), [n] bool (False = padding).
    Returns:
      See _rank_chunk.
    """
    q, q_lab, q_ids = qc
    s = _scores(q, g, g_sq, metric, precision)
    return _rank_chunk(s, q_lab, q_ids, g_lab, g_ids, g_valid, k=k, self_mode=self_mode,
                       axis_name=axis_name)


def _rank_chunk(s, q_lab, q_ids, g_lab, g_ids, g_valid, *, k, self_mode, axis_name):
    """Top-k lists and first-hit statistics from a chunk's scores s [c, n].

    Returns:
      (scores f32 [c, k], indices i32 [c, k], labels i32 [c, k], num_relevant
      i32 [c], first_hit_rank i32 [c]; 0 when the query has no relevant item).
    """
    allowed = g_valid[None, :]
    if self_mode:  # exclude the query's own entry by index, not by column (§7 step 3)
        allowed = allowed & (q_ids[:, None] != g_ids[None, :])
    s = jnp.where(allowed, s, -jnp.inf)
    vals, ids, lab = _local_top_k(s, g_lab, g_ids, k)
    positive = allowed & (q_lab[:, None] == g_lab[None, :])
    num_rel = jnp.sum(positive, axis=1, dtype=jnp.int32)
    # The nearest relevant item in one pass: argmax returns the first (lowest
    # index) of equal maxima, i.e. the tie rule.
    # (max and argmax are separate reductions so that XLA fuses the masking
    # into each and never writes a second [c, n] array.)
    arg = jnp.argmax(jnp.where(positive, s, -jnp.inf), axis=1)
    best = jnp.max(jnp.where(positive, s, -jnp.inf), axis=1)
    big = jnp.iinfo(jnp.int32).max
    best_id = jnp.where(jnp.isneginf(best), big, g_ids[arg])
    if axis_name is not None:
        vals, ids, lab = (lax.all_gather(a, axis_name, axis=1, tiled=True)
                          for a in (vals, ids, lab))
        num_rel = lax.psum(num_rel, axis_name)
        global_best = lax.pmax(best, axis_name)
        best_id = lax.pmin(jnp.where(best == global_best, best_id, big), axis_name)
        best = global_best
    vals, ids, lab = _merge_top_k(vals, ids, lab, k)
    # Items ranked before the first relevant one under the tie rule
    # (ineligible items are -inf: never ahead of a finite best).
    ahead = (s > best[:, None]) | ((s == best[:, None]) & (g_ids[None, :] < best_id[:, None]))
    before = jnp.sum(ahead, axis=1, dtype=jnp.int32)
    if axis_name is not None:
        before = lax.psum(before, axis_name)
    rank = jnp.where(num_rel > 0, before + 1, 0)
    return vals, ids, lab, num_rel, rank


@functools.partial(jax.jit, static_argnames=("metric", "k", "self_mode", "chunk", "mesh",
                                             "precision"))
def _search(q, q_lab, q_ids, g, g_sq, g_lab, g_ids, g_valid, *, metric, k, self_mode, chunk,
            mesh, precision):
    """All query chunks (lax.map) against the gallery; sharded when ``mesh``."""
    n_chunks = q.shape[0] // chunk
    qs = (q.reshape(n_chunks, chunk, -1), q_lab.reshape(n_chunks, chunk),
          q_ids.reshape(n_chunks, chunk))
    axis = None if mesh is None else _AXIS

    def run(qs, *gallery):
        fn = functools.partial(_chunk_neighbours, metric=metric, k=k, self_mode=self_mode,
                               axis_name=axis, precision=precision)
        return lax.map(lambda qc: fn(qc, *gallery), qs)

    if mesh is not None:
        # Outputs are replicated (every list is all-gathered, every statistic
        # psum/pmax/pmin-reduced), but all_gather's result is typed as varying,
        # hence check_vma=False.
        run = jax.shard_map(run, mesh=mesh, in_specs=(P(),) + (P(_AXIS),) * 5,
                            out_specs=P(), check_vma=False)
    out = run(qs, g, g_sq, g_lab, g_ids, g_valid)
    return tuple(o.reshape((n_chunks * chunk,) + o.shape[2:]) for o in out)


def gallery_mesh(devices=None) -> Mesh:
    """1-D mesh ``('data',)`` with Auto axes (not jax.make_mesh: Explicit in JAX 0.10)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), (_AXIS,))


def _place(x: np.ndarray, mesh: Mesh | None, spec):
    if mesh is None:
        return jnp.asarray(x)
    # make_array_from_callback also works when the mesh spans several hosts
    # (every host holds the full host array).
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])


def _to_host(x) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))  # replicated output on multi-host


def _pad_rows(x: np.ndarray, n: int, value=0) -> np.ndarray:
    pad = [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, pad, constant_values=value)


def _labels(lab, n, name):
    if lab is None:
        return np.zeros(n, np.int32)
    lab = np.asarray(lab)
    if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array of shape ({n},), "
                         f"got {lab.dtype} {lab.shape}")
    return lab.astype(np.int32)


def knn_search(query, gallery=None, *, k: int, metric: str = "cosine", query_labels=None,
               gallery_labels=None, chunk_size: int = DEFAULT_CHUNK_SIZE, devices=None,
               shard_threshold: int = DEFAULT_SHARD_THRESHOLD,
               precision=DEFAULT_PRECISION) -> dict[str, np.ndarray]:
    """Exact k-NN of every query in the gallery, under the stable tie rule.

    Args:
      query: float [Q, D] embeddings.
      gallery: float [N, D]; None = the query set is its own gallery and each
        query's own entry is excluded by index.
      k: neighbours per query (>= 1); lists are padded with index -1 when fewer
        than k gallery items are eligible.
      metric: 'cosine' or 'euclidean'.
      query_labels, gallery_labels: optional int [Q] / [N]; give both (or only
        query_labels when gallery is None) to get the label statistics.
      chunk_size: query rows scored at once (peak memory O(chunk_size x N)).
      devices: devices to shard the gallery over (default: all).
      shard_threshold: shard only when N >= this and there are >= 2 devices.
    Returns:
      Host numpy dict: 'scores' f32 [Q, k] (higher = nearer), 'indices' i32
      [Q, k], 'labels' i32 [Q, k] (-1 for padding), 'num_relevant' i32 [Q]
      (same-label eligible gallery items), 'first_hit_rank' i32 [Q] (1-based
      rank of the nearest same-label item, 0 if none).
    """
    check_metric(metric)
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    self_mode = gallery is None
    q = as_embedding_matrix(query, "query")
    g = q if self_mode else as_embedding_matrix(gallery, "gallery")
    if g.shape[1] != q.shape[1]:
        raise ValueError(f"query and gallery dims differ: {q.shape[1]} vs {g.shape[1]}")
    q_lab = _labels(query_labels, q.shape[0], "query_labels")
    g_lab = q_lab if self_mode else _labels(gallery_labels, g.shape[0], "gallery_labels")
    q, _ = prepare(q, metric)
    g, g_sq = prepare(g, metric)

    devices = jax.devices() if devices is None else list(devices)
    mesh = gallery_mesh(devices) if len(devices) > 1 and g.shape[0] >= shard_threshold else None
    n_dev = 1 if mesh is None else len(devices)
    n_g = -(-g.shape[0] // n_dev) * n_dev
    n_chunks = -(-q.shape[0] // chunk_size)
    chunk = -(-q.shape[0] // n_chunks)  # balanced chunks: least padding
    n_q = n_chunks * chunk
    gal = (_pad_rows(g, n_g), _pad_rows(g_sq, n_g), _pad_rows(g_lab, n_g),
           np.arange(n_g, dtype=np.int32), np.arange(n_g) < g.shape[0])
    # Padded queries (rows >= Q) are scored too and dropped; their ids match no
    # valid gallery item, so they never exclude anything.
    qry = (_pad_rows(q, n_q), _pad_rows(q_lab, n_q), np.arange(n_q, dtype=np.int32))
    qry = tuple(_place(a, mesh, P()) for a in qry)
    gal = tuple(_place(a, mesh, P(_AXIS)) for a in gal)
    if mesh is None:
        qry, gal = jax.device_put((qry, gal), devices[0])
    # (A NumPy-BLAS matmul + XLA ranking variant for CPU was measured slower
    # end to end on 2 cores than this single program; removed.)
    out = _search(*qry, *gal, metric=metric, k=int(k), self_mode=self_mode, chunk=chunk,
                  mesh=mesh, precision=precision)
    names = ("scores", "indices", "labels", "num_relevant", "first_hit_rank")
    return {n: _to_host(o)[: q.shape[0]] for n, o in zip(names, out)}
