"""Valid JSON only: NaN and +-Infinity become ``null`` (JSON has neither).

``json.dump`` writes a bare ``NaN`` by default, which no strict JSON reader
accepts; every results file of ours goes through :func:`dump` / :func:`dumps`,
which convert non-finite floats to ``None`` and then serialise with
``allow_nan=False`` (so a value that escaped the conversion is an error here,
not an invalid file later).  NumPy scalars and arrays become Python values.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


def finite_or_none(obj: Any) -> Any:
    """A copy of ``obj`` with every NaN/inf float replaced by None (recursively)."""
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, str) else k: finite_or_none(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_or_none(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """``json.dumps`` of :func:`finite_or_none` (obj), strict (``allow_nan=False``)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def dump(obj: Any, path: str | os.PathLike, *, indent: int | None = 2, **kwargs) -> str:
    """Writes ``obj`` as strict JSON to ``path`` atomically (temp file + rename)."""
    text = dumps(obj, indent=indent, **kwargs)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)
    return os.fspath(path)
