"""Feature npz round trip and the evaluate-from-features CLI."""
import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from deml_jax.evaluation import features as F


def test_round_trip_and_format(tmp_path):
    rng = np.random.default_rng(0)
    emb, lab = rng.standard_normal((9, 4)).astype(np.float32), rng.integers(0, 3, 9)
    names = np.array([f"img_{i}.jpg" for i in range(9)])
    path = F.save_features(str(tmp_path / "f.npz"), emb, lab, ids=np.arange(9) * 2,
                           filenames=names, metadata={"step": 10})
    with np.load(path, allow_pickle=False) as z:  # the documented keys, no pickles
        assert sorted(z.files) == ["embeddings", "filenames", "format_version", "ids", "labels",
                                   "metadata"]
    got = F.load_features(path)
    chex.assert_trees_all_equal(got["embeddings"], emb)
    chex.assert_trees_all_equal(got["labels"], lab.astype(np.int64))
    chex.assert_trees_all_equal(got["ids"], np.arange(9, dtype=np.int64) * 2)
    assert got["filenames"].tolist() == names.tolist() and got["metadata"] == {"step": 10}
    assert not any(p.name.endswith(".tmp") or ".tmp" in p.name for p in tmp_path.iterdir())


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        F.save_features(str(tmp_path / "a.npz"), np.ones((3, 2)), np.zeros(4, int))
    with pytest.raises(ValueError, match="filenames"):
        F.save_features(str(tmp_path / "a.npz"), np.ones((3, 2)), np.zeros(3, int),
                        filenames=np.arange(3))
    np.savez(tmp_path / "old.npz", embeddings=np.ones((2, 2)))
    with pytest.raises(ValueError, match="format_version"):
        F.load_features(str(tmp_path / "old.npz"))


def test_cli_self_mode_matches_brute_force(tmp_path, rng, refs):
    x = refs.tie_heavy(rng, 50, dim=6, nnz=4)
    lab = rng.integers(0, 6, 50)
    path = F.save_features(str(tmp_path / "t.npz"), x, lab)
    out = tmp_path / "m.json"
    res = F.main(["--features", path, "--ks", "1,3,10", "--output", str(out)])
    ref = refs.metrics(x, lab, ks=(1, 3, 10))
    for k, v in ref.items():
        assert res[k] == pytest.approx(v, abs=1e-6), k
    assert json.loads(out.read_text())["recall@3"] == res["recall@3"]


def test_cli_query_gallery_subprocess(tmp_path):
    # The In-Shop-like hand case of test_retrieval_metrics.py, via `python -m`.
    gal = F.save_features(str(tmp_path / "g.npz"),
                          np.array([[0.0], [1], [2], [10], [11], [20]]),
                          np.array([0, 1, 0, 2, 2, 1]))
    qry = F.save_features(str(tmp_path / "q.npz"), np.array([[0.4], [10.6], [14.6], [5.0]]),
                          np.array([0, 2, 1, 3]))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-m", "deml_jax.evaluation.features", "--features",
                           gal, "--query", qry, "--ks", "1,4", "--metric", "euclidean"],
                          capture_output=True, text=True, env=env, timeout=120, check=True)
    res = json.loads(proc.stdout)
    assert res["recall@1"] == pytest.approx(2 / 3) and res["recall@4"] == 1.0
    assert res["map@r"] == pytest.approx(0.5) and res["num_excluded_queries"] == 1
