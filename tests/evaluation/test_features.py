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
        assert res[k] == pytest.approx(v, abs=1e-5), k
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


def _full_npz(path, **over):
    arrays = dict(embeddings=np.ones((3, 2), np.float32), labels=np.array([0, 1, 1]),
                  ids=np.arange(3), filenames=np.array(["a", "b", "c"]),
                  metadata=np.array("{}"), format_version=np.array(F.FORMAT_VERSION))
    arrays.update(over)
    np.savez(path, **arrays)
    return str(path)


def _assert_clear(err, path, found):
    msg = str(err)
    assert str(path) in msg and "expected" in msg and found in msg, msg
    assert "pickle" not in msg.lower() and "unsafe" not in msg.lower(), msg


def test_load_errors_name_the_file_what_was_expected_and_found(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("recall 0.5\n")
    with pytest.raises(ValueError) as info:
        F.load_features(str(text))
    _assert_clear(info.value, text, "text starting with 'recall 0.5'")
    npy = tmp_path / "emb.npy"
    np.save(npy, np.zeros((3, 2)))
    with pytest.raises(ValueError) as info:  # was a TypeError
        F.load_features(str(npy))
    _assert_clear(info.value, npy, "a single .npy array (float64 (3, 2))")
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(ValueError) as info:
        F.load_features(str(empty))
    _assert_clear(info.value, empty, "an empty file")
    with pytest.raises(FileNotFoundError, match="missing.npz: no such file"):
        F.load_features(str(tmp_path / "missing.npz"))
    partial = tmp_path / "partial.npz"
    np.savez(partial, embeddings=np.ones((2, 2)), labels=np.zeros(2, int))
    with pytest.raises(ValueError) as info:
        F.load_features(str(partial))
    _assert_clear(info.value, partial, "missing ['ids', 'filenames', 'metadata', "
                                       "'format_version']")


def test_bad_arrays_blame_the_right_key(tmp_path):
    flat = _full_npz(tmp_path / "flat.npz", embeddings=np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"flat\.npz: 'embeddings' must be a float \[N, D\] "
                                         r"matrix; found float32 \(3,\)"):
        F.load_features(flat)
    short = _full_npz(tmp_path / "short.npz", labels=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"short\.npz: 'labels' must be int \[3\].*\(2,\)"):
        F.load_features(short)
    objs = tmp_path / "objs.npz"
    _full_npz(objs, filenames=np.array([{"a": 1}, None, 3], dtype=object))
    with pytest.raises(ValueError) as info:
        F.load_features(str(objs))
    _assert_clear(info.value, objs, "'filenames' holding Python objects")


def test_cli_error_is_one_line(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert F.cli(["--features", str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(text) in err and "Traceback" not in err


def test_chunk_size_flag_spellings():
    assert F._parse(["--features", "x", "--chunk_size", "7"]).chunk_size == 7
    assert F._parse(["--features", "x", "--chunk-size", "9"]).chunk_size == 9  # old, hidden
    assert F._parse(["--features", "x"]).chunk_size == F.knn_lib.DEFAULT_CHUNK_SIZE


def test_chunk_size_help_shows_the_underscore_spelling(capsys):
    with pytest.raises(SystemExit):
        F._parse(["--help"])
    out = capsys.readouterr().out
    assert "--chunk_size" in out and "--chunk-size" not in out


@pytest.mark.parametrize("labels, why", [
    (np.zeros(6, int), "1 class"),  # every metric would be 1.0
    (np.arange(6), "0 of 6 queries"),  # recall NaN, num_queries 0, nmi 1.0
])
def test_degenerate_test_sets_are_errors(tmp_path, labels, why):
    from deml_jax.evaluation.metrics import DegenerateEvaluationError
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    path = F.save_features(str(tmp_path / "d.npz"), x, labels)
    out = tmp_path / "m.json"
    with pytest.raises(DegenerateEvaluationError, match=why):
        F.main(["--features", path, "--clustering", "--output", str(out)])
    assert not out.exists()


def test_query_gallery_without_shared_labels_is_an_error(tmp_path):
    from deml_jax.evaluation.metrics import DegenerateEvaluationError
    gal = F.save_features(str(tmp_path / "g.npz"), np.eye(4, dtype=np.float32),
                          np.array([0, 0, 1, 1]))
    qry = F.save_features(str(tmp_path / "q.npz"), np.eye(4, dtype=np.float32)[:2],
                          np.array([5, 6]))
    with pytest.raises(DegenerateEvaluationError, match="no query label occurs in the gallery"):
        F.main(["--features", gal, "--query", qry])
