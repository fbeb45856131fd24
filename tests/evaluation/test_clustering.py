"""k-means on device, NMI and pairwise F1 against scikit-learn and pair loops."""
import itertools

import chex
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import normalized_mutual_info_score

from deml_jax.evaluation.clustering import clustering_metrics, kmeans, nmi, pairwise_f1


@pytest.mark.parametrize("n,a,b", [(200, 7, 5), (50, 3, 9), (31, 1, 4)])
def test_nmi_matches_sklearn(n, a, b):
    rng = np.random.default_rng(n)
    y, c = rng.integers(0, a, n) * 3 + 100, rng.integers(0, b, n)
    assert nmi(y, c) == pytest.approx(normalized_mutual_info_score(y, c), abs=1e-12)
    assert nmi(y, y) == pytest.approx(normalized_mutual_info_score(y, y), abs=1e-12)


def _f1_pair_loop(y, c):
    tp = fp = fn = 0
    for i, j in itertools.combinations(range(len(y)), 2):
        same_y, same_c = y[i] == y[j], c[i] == c[j]
        tp += same_y and same_c
        fp += same_c and not same_y
        fn += same_y and not same_c
    p, r = tp / (tp + fp), tp / (tp + fn)
    return 2 * p * r / (p + r)


def test_pairwise_f1_matches_pair_loop():
    rng = np.random.default_rng(3)
    for _ in range(3):
        y, c = rng.integers(0, 4, 60), rng.integers(0, 5, 60)
        assert pairwise_f1(y, c) == pytest.approx(_f1_pair_loop(y, c), abs=1e-12)
    assert pairwise_f1(y, y) == 1.0
    assert pairwise_f1(np.arange(5), np.arange(5)) == 0.0  # no positive pairs at all


def test_well_separated_blobs_give_one_like_sklearn():
    x, y = make_blobs(400, centers=6, n_features=10, cluster_std=0.3, random_state=0)
    res = clustering_metrics(x, y, seed=0, metric="euclidean")
    sk = KMeans(6, n_init=10, random_state=0).fit_predict(x)
    assert normalized_mutual_info_score(y, sk) == 1.0
    assert res["nmi"] == 1.0 and res["f1"] == 1.0 and res["num_clusters"] == 6


def test_kmeans_is_a_lloyd_fixed_point_and_seeded():
    x, _ = make_blobs(300, centers=5, n_features=4, cluster_std=2.0, random_state=1)
    centers, assign, iters = kmeans(x, 5, seed=7, chunk_size=64)
    assert 1 <= iters <= 100
    d = ((x[:, None, :] - centers[None].astype(np.float64)) ** 2).sum(-1)
    chex.assert_trees_all_equal(assign, np.argmin(d, 1).astype(np.int32))
    for j in range(5):
        chex.assert_trees_all_close(centers[j], x[assign == j].mean(0).astype(np.float32),
                                    rtol=1e-4, atol=1e-4)
    again = kmeans(x, 5, seed=7, chunk_size=300)[1]
    chex.assert_trees_all_equal(assign, again)


def test_errors():
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(np.ones((3, 2)), 4)
    with pytest.raises(ValueError, match="labels"):
        clustering_metrics(np.ones((3, 2)), np.zeros(4, int))
    with pytest.raises(ValueError, match="same length"):
        nmi(np.zeros(3), np.zeros(4))
