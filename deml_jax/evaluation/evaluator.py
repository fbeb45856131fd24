"""The evaluator the trainer calls: embed a split once, then the metrics.

Eval batches are ordered, padded and masked (the data pipeline's contract):
each batch is a dict with 'image' float [..., H, W, 3], 'label' int [...],
'mask' bool [...] (False = padding) and 'index' int [...] (the example's
position in the split).  Leading batch dims are free, e.g. [devices,
per_device].  Padding rows are dropped by mask; rows from all processes are
all-gathered and de-duplicated by index, so every image counts exactly once
whatever the number of devices and hosts (docs/reference.md §7: each of the
5,924 CUB test images once, no wrap-around rows).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from deml_jax.evaluation import clustering as clustering_lib
from deml_jax.evaluation import knn as knn_lib
from deml_jax.evaluation import metrics as metrics_lib

Batch = Mapping[str, Any]
_KEYS = ("image", "label", "mask", "index")


def _default_allgather(tree):
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: np.asarray(x)[None], tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree)


def gather_examples(embeddings: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                    allgather: Callable | None = None) -> tuple[np.ndarray, ...]:
    """All processes' rows, each split index once, sorted by index.

    Args:
      embeddings float [n, D], labels int [n], indices int [n]: this process's
        unmasked rows (n may differ between processes).
      allgather: tree -> tree with a leading process axis (default:
        multihost_utils.process_allgather; identity-like on one process).
    Returns:
      (embeddings float32 [N, D], labels [N], indices [N]) sorted by index.
    """
    allgather = allgather or _default_allgather
    n_max = int(np.max(allgather(np.array([len(indices)]))))
    pad = n_max - len(indices)
    local = {
        "emb": np.pad(embeddings, ((0, pad), (0, 0))),
        "label": np.pad(labels, (0, pad)),
        "index": np.pad(indices, (0, pad)),
        "valid": np.arange(n_max) < len(indices),
    }
    glob = {k: np.asarray(v).reshape((-1,) + np.shape(v)[2:]) for k, v in allgather(local).items()}
    keep = glob["valid"]
    emb, lab, idx = glob["emb"][keep], glob["label"][keep], glob["index"][keep]
    order = np.argsort(idx, kind="stable")
    emb, lab, idx = emb[order], lab[order], idx[order]
    same = idx[1:] == idx[:-1]  # duplicates (padding repeats) are now adjacent
    clash = same & (lab[1:] != lab[:-1])
    if clash.any():
        raise ValueError("the same split index appears with different labels: "
                         f"{idx[1:][clash][:5].tolist()}")
    first = np.concatenate([[True], ~same])
    return emb[first].astype(np.float32), lab[first], idx[first]


def _check_batch(batch: Batch, split: str) -> None:
    missing = [k for k in _KEYS if k not in batch]
    if missing:
        raise ValueError(f"eval batch of split {split!r} lacks keys {missing}; "
                         f"expected {list(_KEYS)}, got {sorted(batch)}")
    lead = np.shape(batch["mask"])
    for k in ("label", "index"):
        if np.shape(batch[k]) != lead:
            raise ValueError(f"batch[{k!r}] must have the mask's shape {lead}, "
                             f"got {np.shape(batch[k])}")


def embed_split(embed_fn: Callable, batches: Iterable[Batch], *, split: str = "test",
                allgather: Callable | None = None) -> dict[str, np.ndarray]:
    """Embeds every unmasked example of a split once.

    Args:
      embed_fn: images float [..., H, W, 3] -> embeddings [..., D] (same
        leading dims; this process's rows).
      batches: iterable of eval batches (module docstring).
    Returns:
      {'embeddings' float32 [N, D], 'labels' [N], 'indices' [N]} sorted by index.
    """
    parts = []
    for batch in batches:
        _check_batch(batch, split)
        # Keep the device result un-fetched so the next batch is dispatched
        # while this one runs.
        parts.append((embed_fn(batch["image"]), np.asarray(batch["mask"], bool),
                      np.asarray(batch["label"]), np.asarray(batch["index"])))
    if not parts:
        raise ValueError(f"split {split!r} produced no batches")
    embs, labs, idxs = [], [], []
    for emb, mask, lab, idx in parts:
        emb = np.asarray(emb)
        if emb.shape[:mask.ndim] != mask.shape or emb.ndim != mask.ndim + 1:
            raise ValueError(f"embed_fn must return [{', '.join(map(str, mask.shape))}, D] "
                             f"for split {split!r}, got {emb.shape}")
        embs.append(emb[mask])
        labs.append(lab[mask])
        idxs.append(idx[mask])
    emb, lab, idx = gather_examples(np.concatenate(embs), np.concatenate(labs),
                                    np.concatenate(idxs), allgather)
    return {"embeddings": emb, "labels": lab, "indices": idx}


class RetrievalEvaluator:
    """Embeds the eval split(s) once per run and computes the retrieval metrics.

    Args:
      embed_fn: images [..., H, W, 3] -> embeddings [..., D] (the trainer
        closes over params and handles pmap/jit).
      splits: mode 'self': {'test': fn}; mode 'query_gallery': {'query': fn,
        'gallery': fn}; each fn() returns an iterable of eval batches.
      mode: 'self' (query set = gallery, self excluded; CUB, Cars, SOP) or
        'query_gallery' (In-Shop).
      ks, metric, chunk_size, map_at_r, devices, shard_threshold: see
        metrics.retrieval_metrics.
      clustering: also NMI and F1 (k-means on the test split; on the gallery
        in query_gallery mode).
      prefix: prepended to every result key (e.g. 'test/').
      allgather: multi-process gather (default process_allgather).
      on_degenerate: a split with fewer than 2 classes or no query with a
        relevant item (metrics.check_evaluable): 'raise' the
        DegenerateEvaluationError (the CLIs), or 'warn' (a training run: a
        loud warning on stderr and None for every metric, null in JSON).
    """

    def __init__(self, embed_fn: Callable, splits: Mapping[str, Callable[[], Iterable[Batch]]],
                 *, mode: str = "self", ks=(1, 2, 4, 8), metric: str = "cosine",
                 clustering: bool = True, chunk_size: int = knn_lib.DEFAULT_CHUNK_SIZE,
                 prefix: str = "", map_at_r: bool = True, seed: int = 0, devices=None,
                 shard_threshold: int = knn_lib.DEFAULT_SHARD_THRESHOLD,
                 allgather: Callable | None = None, on_degenerate: str = "raise"):
        if on_degenerate not in ("raise", "warn"):
            raise ValueError(f"on_degenerate must be 'raise' or 'warn', got {on_degenerate!r}")
        self.on_degenerate = on_degenerate
        need = {"self": ("test",), "query_gallery": ("query", "gallery")}
        if mode not in need:
            raise ValueError(f"mode must be 'self' or 'query_gallery', got {mode!r}")
        if sorted(splits) != sorted(need[mode]):
            raise ValueError(f"mode {mode!r} needs splits {need[mode]}, got {sorted(splits)}")
        knn_lib.check_metric(metric)
        self.embed_fn, self.splits, self.mode = embed_fn, dict(splits), mode
        self.ks, self.metric, self.clustering = metrics_lib._check_ks(ks), metric, clustering
        self.metric_kw = dict(chunk_size=chunk_size, map_at_r=map_at_r, devices=devices,
                              shard_threshold=shard_threshold)
        self.prefix, self.seed, self.allgather = prefix, seed, allgather
        self.last: dict[str, dict[str, np.ndarray]] = {}

    def run(self) -> dict[str, float]:
        """Returns metrics + 'eval_time_s', 'embed_time_s', 'num_queries',
        'num_excluded_queries' (keys prefixed); keeps the embeddings in .last."""
        t0 = time.perf_counter()
        self.last = {name: embed_split(self.embed_fn, self.splits[name](), split=name,
                                       allgather=self.allgather) for name in sorted(self.splits)}
        t_embed = time.perf_counter() - t0
        q, g = ((self.last["test"],) * 2 if self.mode == "self"
                else (self.last["query"], self.last["gallery"]))
        try:
            metrics_lib.check_evaluable(q["labels"], None if self.mode == "self" else g["labels"],
                                        what=f"split(s) {'/'.join(sorted(self.splits))}")
        except metrics_lib.DegenerateEvaluationError as err:
            if self.on_degenerate == "raise":
                raise
            res = self._null_metrics(q["labels"], None if self.mode == "self" else g["labels"])
            print(f"WARNING: evaluation skipped, every metric is null: {err}",
                  file=sys.stderr, flush=True)
            res.update(embed_time_s=t_embed, eval_time_s=time.perf_counter() - t0)
            return {self.prefix + k: v for k, v in res.items()}
        if self.mode == "self":
            res = metrics_lib.retrieval_metrics(q["embeddings"], q["labels"], ks=self.ks,
                                                metric=self.metric, **self.metric_kw)
        else:
            q, g = self.last["query"], self.last["gallery"]
            res = metrics_lib.retrieval_metrics(q["embeddings"], q["labels"], g["embeddings"],
                                                g["labels"], ks=self.ks, metric=self.metric,
                                                **self.metric_kw)
        res.pop("metric")
        if self.clustering:
            clu = clustering_lib.clustering_metrics(g["embeddings"], g["labels"], self.seed,
                                                    metric=self.metric)
            res.update(nmi=clu["nmi"], f1=clu["f1"])
        res.update(embed_time_s=t_embed, eval_time_s=time.perf_counter() - t0)
        return {self.prefix + k: (float(v) if isinstance(v, float) else v) for k, v in res.items()}

    def _null_metrics(self, query_labels, gallery_labels) -> dict:
        """Every metric key of a normal run with value None (JSON null)."""
        keys = [f"recall@{k}" for k in self.ks] + ["p@1"]
        if self.metric_kw["map_at_r"]:
            keys += ["r_precision", "map@r"]
        if self.clustering:
            keys += ["nmi", "f1"]
        valid = metrics_lib.count_valid_queries(query_labels, gallery_labels)
        out = dict.fromkeys(keys)
        out.update(num_queries=valid, num_excluded_queries=int(len(query_labels) - valid))
        return out
