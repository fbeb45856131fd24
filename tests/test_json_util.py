"""deml_jax.json_util: results files are always strict JSON."""
import json
import math

import numpy as np
import pytest

from deml_jax import json_util


def _strict_loads(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_values_become_null(tmp_path):
    obj = {"recall@1": float("nan"), "f1": np.float32("inf"), "ok": np.float64(0.5),
           "n": np.int64(3), "nested": {"list": [1.0, -math.inf, (2, float("nan"))]},
           "arr": np.array([0.25, np.nan])}
    assert "NaN" in json.dumps({"x": float("nan")})  # what plain json.dump writes
    got = _strict_loads(json_util.dumps(obj))
    assert got == {"recall@1": None, "f1": None, "ok": 0.5, "n": 3,
                   "nested": {"list": [1.0, None, [2, None]]}, "arr": [0.25, None]}
    path = json_util.dump(obj, tmp_path / "r.json")
    assert _strict_loads(open(path).read()) == got
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left


def test_unserialisable_is_an_error():
    with pytest.raises(TypeError):
        json_util.dumps({"x": object()})
