"""Exported features (npz) and evaluation from them.

The npz format (version 1), read with ``allow_pickle=False``:

- ``embeddings`` float32 [N, D]: the inference embedding (docs/reference.md
  §7 step 2: I*J L2-normalised learner embeddings, concatenated);
- ``labels`` int64 [N]; ``ids`` int64 [N]: the example's position in its split;
- ``filenames`` unicode [N] ('' where unknown);
- ``metadata`` unicode scalar: a JSON object (config, checkpoint step, split...);
- ``format_version`` int64 scalar.

Evaluate exported features (self mode, or query vs gallery)::

  python -m deml_jax.evaluation.features --features test.npz --ks 1,2,4,8
  python -m deml_jax.evaluation.features --features gallery.npz --query query.npz \
      --benchmark inshop
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from deml_jax import json_util
from deml_jax.evaluation import knn as knn_lib
from deml_jax.evaluation.clustering import clustering_metrics
from deml_jax.evaluation.metrics import RECALL_KS, retrieval_metrics

FORMAT_VERSION = 1


def save_features(path: str, embeddings, labels, *, ids=None, filenames=None,
                  metadata: dict[str, Any] | None = None) -> str:
    """Writes the npz atomically (temporary file, then rename); returns path.

    Args:
      embeddings: float [N, D]; labels: int [N]; ids: int [N] (default 0..N-1);
      filenames: N strings (default ''); metadata: JSON-serialisable dict.
    """
    emb = knn_lib.as_embedding_matrix(embeddings, "embeddings")
    n = emb.shape[0]
    arrays = {"embeddings": emb,
              "labels": np.asarray(labels),
              "ids": np.arange(n) if ids is None else np.asarray(ids),
              "filenames": np.full(n, "") if filenames is None else np.asarray(filenames)}
    for name in ("labels", "ids"):
        a = arrays[name]
        if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must be an integer array of shape ({n},), "
                             f"got {a.dtype} {a.shape}")
        arrays[name] = a.astype(np.int64)
    if arrays["filenames"].shape != (n,) or arrays["filenames"].dtype.kind != "U":
        raise ValueError(f"filenames must be {n} strings, got {arrays['filenames'].dtype} "
                         f"{arrays['filenames'].shape}")
    arrays["metadata"] = np.array(json.dumps(metadata or {}, sort_keys=True))
    arrays["format_version"] = np.array(FORMAT_VERSION, np.int64)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


_EXPECTED = ("a features .npz written by save_features / python -m deml_jax.export_features "
             "(keys embeddings, labels, ids, filenames, metadata, format_version)")
_KEYS = ("embeddings", "labels", "ids", "filenames", "metadata", "format_version")


def _what_is(path: str) -> str:
    """A short description of a file that is not a features npz."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "an empty file"
    if head.startswith(b"\x93NUMPY"):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            return f"a single .npy array ({arr.dtype} {arr.shape})"
        except ValueError:
            return "a .npy file of Python objects"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data starting with {head[:8]!r}"
    return f"text starting with {text.splitlines()[0][:40]!r}" if text.strip() else "blank text"


def load_features(path: str) -> dict[str, Any]:
    """Reads a features npz: the arrays above, 'metadata' as a dict.

    Raises FileNotFoundError / ValueError naming ``path``, what was expected
    and what was found (never advice to unpickle: nothing here is a pickle).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected {_EXPECTED})")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if not is_zip:
        raise ValueError(f"{path}: expected {_EXPECTED}; found {_what_is(path)}")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as err:  # a damaged zip
        raise ValueError(f"{path}: expected {_EXPECTED}; found an unreadable zip "
                         f"({type(err).__name__}: {err})") from None
    with z:
        missing = [k for k in _KEYS if k not in z.files]
        if missing:
            raise ValueError(f"{path}: expected {_EXPECTED}; found keys {sorted(z.files)} "
                             f"(missing {missing})")
        out = {}
        for key in _KEYS:
            try:
                out[key] = z[key]
            except ValueError:  # an object array: refused, never unpickled
                raise ValueError(f"{path}: expected {_EXPECTED}; found {key!r} holding "
                                 "Python objects, not a plain array (never loaded)") from None
        try:
            version = int(out.pop("format_version"))
            out["metadata"] = json.loads(str(out["metadata"]))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: expected {_EXPECTED}; found a bad 'format_version' "
                             f"or 'metadata' entry ({err})") from None
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {FORMAT_VERSION} expected, got {version}")
    emb = out["embeddings"]
    if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"{path}: 'embeddings' must be a float [N, D] matrix; found "
                         f"{emb.dtype} {emb.shape}")
    n = emb.shape[0]
    for key in ("labels", "ids"):
        a = out[key]
        if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{path}: {key!r} must be int [{n}] (one per embedding row); "
                             f"found {a.dtype} {a.shape}")
    if out["filenames"].shape != (n,):
        raise ValueError(f"{path}: 'filenames' must hold {n} strings; found "
                         f"{out['filenames'].dtype} {out['filenames'].shape}")
    return out


def evaluate_features(features: dict, query: dict | None = None, *, ks=(1, 2, 4, 8),
                      metric: str = "cosine", clustering: bool = False, **kw) -> dict:
    """retrieval_metrics (+ clustering_metrics) of loaded features.

    Args:
      features: load_features() output, the gallery (or the self set).
      query: load_features() output for query/gallery mode (In-Shop), or None.
      kw: chunk_size, devices, shard_threshold, map_at_r.
    """
    if query is None:
        res = retrieval_metrics(features["embeddings"], features["labels"], ks=ks,
                                metric=metric, **kw)
    else:
        res = retrieval_metrics(query["embeddings"], query["labels"], features["embeddings"],
                                features["labels"], ks=ks, metric=metric, **kw)
    if clustering:
        clu = clustering_metrics(features["embeddings"], features["labels"], metric=metric)
        res.update(nmi=clu["nmi"], f1=clu["f1"])
    return res


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m deml_jax.evaluation.features",
                                description="Retrieval metrics from exported features.")
    p.add_argument("--features", required=True, help="npz: the gallery, or the self set")
    p.add_argument("--query", help="npz of queries (query vs gallery mode, e.g. In-Shop)")
    p.add_argument("--benchmark", choices=sorted(RECALL_KS),
                   help="use this benchmark's Recall@K set")
    p.add_argument("--ks", help="comma-separated Recall@K cut-offs (default 1,2,4,8)")
    p.add_argument("--metric", default="cosine", choices=knn_lib.METRICS)
    p.add_argument("--chunk_size", type=int, default=knn_lib.DEFAULT_CHUNK_SIZE,
                   help="query rows per k-NN chunk (peak memory O(chunk_size x N))")
    p.add_argument("--chunk-size", dest="chunk_size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--clustering", action="store_true", help="also NMI and F1 (k-means)")
    p.add_argument("--output", help="also write the metrics to this JSON file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the CLI; bad input raises (see :func:`cli`)."""
    args = _parse(argv)
    if args.ks and args.benchmark:
        raise ValueError("give --ks or --benchmark, not both")
    if args.ks:
        try:
            ks = tuple(int(k) for k in args.ks.split(","))
        except ValueError:
            raise ValueError(f"--ks must be comma-separated integers, got {args.ks!r}") from None
    else:
        ks = RECALL_KS[args.benchmark] if args.benchmark else (1, 2, 4, 8)
    feats = load_features(args.features)
    query = load_features(args.query) if args.query else None
    res = evaluate_features(feats, query, ks=ks, metric=args.metric, clustering=args.clustering,
                            chunk_size=args.chunk_size)
    text = json_util.dumps(res, indent=1, sort_keys=True)  # NaN -> null: valid JSON
    print(text)
    if args.output:
        json_util.dump(res, args.output, indent=1, sort_keys=True)
    return res


def cli(argv: Sequence[str] | None = None) -> int:
    """``main`` with input errors as one line on stderr and exit status 2."""
    try:
        main(argv)
    except (ValueError, OSError) as err:
        print(f"deml_jax.evaluation.features: error: {err}", file=sys.stderr)
        return 2
    return 0


def run():
    """Console script ``deml-eval-features`` (pyproject.toml)."""
    sys.exit(cli(sys.argv[1:]))


if __name__ == "__main__":
    run()
