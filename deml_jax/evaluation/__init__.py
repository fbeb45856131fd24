"""Retrieval and clustering evaluation on device (exact, chunked, sharded).

Names are imported lazily so that ``python -m deml_jax.evaluation.features``
does not import its own module twice.
"""
import importlib

_EXPORTS = {
    "RECALL_KS": "metrics", "retrieval_metrics": "metrics", "ranked_list_stats": "metrics",
    "DegenerateEvaluationError": "metrics", "check_evaluable": "metrics",
    "knn_search": "knn",
    "clustering_metrics": "clustering", "kmeans": "clustering", "nmi": "clustering",
    "pairwise_f1": "clustering",
    "RetrievalEvaluator": "evaluator", "embed_split": "evaluator",
    "evaluate_features": "features", "load_features": "features", "save_features": "features",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
