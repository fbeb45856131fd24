"""Exact chunked/sharded k-NN against a brute-force full argsort (conftest)."""
import chex
import jax
import numpy as np
import pytest
from jax import lax

from deml_jax.evaluation.knn import knn_search


def test_lax_top_k_is_index_stable_on_ties():
    # The documented tie rule relies on lax.top_k picking lower indices first.
    rng = np.random.default_rng(1)
    s = rng.integers(0, 3, (16, 300)).astype(np.float32)
    _, idx = lax.top_k(s, 50)
    expected = np.argsort(-s, axis=1, kind="stable")[:, :50]
    chex.assert_trees_all_equal(np.asarray(idx), expected)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_self_mode_matches_brute_force_with_ties(rng, refs, metric, chunk_size):
    x = refs.tie_heavy(rng, 40)
    x[5] = x[9]  # exact duplicates tie on every score
    k = 12
    got = knn_search(x, k=k, metric=metric, chunk_size=chunk_size, devices=jax.devices()[:1])
    ref = np.stack([o[:k] for o in refs.rankings(x, metric=metric)])
    chex.assert_trees_all_equal(got["indices"], ref.astype(np.int32))
    assert not np.any(got["indices"] == np.arange(40)[:, None])  # self excluded


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_query_gallery_mode_and_first_hit_rank(rng, refs, metric):
    gal = refs.tie_heavy(rng, 57, dim=6, nnz=4)
    qry = np.concatenate([gal[:6], refs.tie_heavy(rng, 17, dim=6, nnz=4)])
    gl, ql = rng.integers(0, 6, 57), rng.integers(0, 7, 23)
    got = knn_search(qry, gal, k=9, metric=metric, query_labels=ql, gallery_labels=gl,
                     chunk_size=5, devices=jax.devices()[:1])
    orders = refs.rankings(qry, gal, metric)
    chex.assert_trees_all_equal(got["indices"], np.stack([o[:9] for o in orders]).astype(np.int32))
    for i, o in enumerate(orders):
        rel = gl[o] == ql[i]
        assert got["num_relevant"][i] == rel.sum()
        assert got["first_hit_rank"][i] == (np.argmax(rel) + 1 if rel.any() else 0)
    # the query's own copy in the gallery is NOT excluded in query/gallery mode
    chex.assert_trees_all_equal(got["indices"][:6, 0], np.arange(6, dtype=np.int32))


@pytest.mark.parametrize("self_mode", [True, False])
def test_eight_devices_equal_one_and_padding_never_leaks(rng, refs, self_mode):
    assert len(jax.devices()) == 8
    x = refs.tie_heavy(rng, 61)  # 61 gallery rows: 3 padded rows on 8 devices
    lab = rng.integers(0, 9, 61)
    gal, gl = (None, None) if self_mode else (x[::-1].copy(), lab[::-1].copy())
    kw = dict(k=70, query_labels=lab, gallery_labels=gl, chunk_size=16)
    one = knn_search(x, gal, devices=jax.devices()[:1], **kw)
    eight = knn_search(x, gal, shard_threshold=0, **kw)
    chex.assert_trees_all_equal(one, eight)
    n_eligible = 60 if self_mode else 61
    assert (eight["indices"] < 61).all()
    assert (eight["indices"][:, n_eligible:] == -1).all()  # k > gallery: padded, -inf
    assert np.isneginf(eight["scores"][:, n_eligible:]).all()
    assert (eight["indices"][:, :n_eligible] >= 0).all()


def test_bad_inputs_raise():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="metric"):
        knn_search(x, k=1, metric="l1")
    with pytest.raises(ValueError, match="k must"):
        knn_search(x, k=0)
    with pytest.raises(ValueError, match="dims differ"):
        knn_search(x, np.ones((4, 2)), k=1)
    with pytest.raises(ValueError, match="NaN"):
        knn_search(np.full((4, 3), np.nan), k=1)
    with pytest.raises(ValueError, match="query_labels"):
        knn_search(x, k=1, query_labels=np.zeros(3, int))
