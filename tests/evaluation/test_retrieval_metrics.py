"""Retrieval metrics against hand-worked cases and a brute-force reference."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deml_jax.evaluation.metrics import RECALL_KS, ranked_list_stats, retrieval_metrics

# pytorch-metric-learning, tests/utils/test_calculate_accuracies.py
# (TestCalculateAccuracies.test_accuracy_calculator): neighbour labels of 5
# queries and the reference label counts, with the expected values worked by
# hand there.  Reference, not same source: R = label count.
PML_QUERY_LABELS = np.array([1, 1, 2, 3, 4])
PML_KNN_LABELS = np.array([[0, 1, 1, 2, 2], [1, 0, 1, 1, 3], [4, 4, 4, 4, 2],
                           [3, 1, 3, 1, 3], [0, 0, 4, 2, 2]])
PML_COUNTS = {1: 3, 2: 5, 3: 4, 4: 5}


def _pml_stats(same_source):
    knn = PML_KNN_LABELS[:, 1:] if same_source else PML_KNN_LABELS  # PML drops col 0
    r = np.array([PML_COUNTS[y] - int(same_source) for y in PML_QUERY_LABELS])
    hits = knn == PML_QUERY_LABELS[:, None]
    ap, rp = ranked_list_stats(jnp.asarray(hits), jnp.asarray(r))
    return np.asarray(ap), np.asarray(rp)


def test_map_at_r_pml_worked_example_reference_mode():
    ap, rp = _pml_stats(same_source=False)
    expected_ap = [(1 / 2 + 2 / 3) / 3, (1 + 2 / 3) / 3, (1 / 5) / 5, (1 + 2 / 3) / 4, (1 / 3) / 5]
    chex.assert_trees_all_close(ap, np.array(expected_ap, np.float32), rtol=1e-5)
    chex.assert_trees_all_close(rp, np.array([2 / 3, 2 / 3, 1 / 5, 2 / 4, 1 / 5], np.float32),
                                rtol=1e-5)


def test_map_at_r_pml_worked_example_same_source():
    ap, rp = _pml_stats(same_source=True)
    expected_ap = [1.0, (1 / 2) / 2, (1 / 4) / 4, (1 / 2) / 3, (1 / 2) / 4]
    chex.assert_trees_all_close(ap, np.array(expected_ap, np.float32), rtol=1e-5)
    chex.assert_trees_all_close(rp, np.array([1, 1 / 2, 1 / 4, 1 / 3, 1 / 4], np.float32),
                                rtol=1e-5)


def test_map_at_r_reality_check_example():
    # Musgrave et al. 2020 §3.2 style: R = 10, relevant at ranks 1, 2, 3 ->
    # MAP@R = (1 + 1 + 1) / 10 = 0.3; relevant at 1 and 3 -> (1 + 2/3) / 10.
    hits = np.zeros((2, 12), bool)
    hits[0, :3] = True
    hits[1, [0, 2, 11]] = True  # rank 12 > R: does not count
    ap, rp = ranked_list_stats(jnp.asarray(hits), jnp.array([10, 10]))
    chex.assert_trees_all_close(np.asarray(ap), np.array([0.3, (1 + 2 / 3) / 10], np.float32),
                                rtol=1e-5)
    chex.assert_trees_all_close(np.asarray(rp), np.array([0.3, 0.2], np.float32), rtol=1e-5)


def test_inshop_like_query_gallery_hand_case():
    # 1-D gallery at 0, 1, 2, 10, 11, 20 with labels A B A C C B; queries at
    # 0.4 (A), 10.6 (C), 14.6 (B), 5 (D, not in the gallery: excluded).
    # Rankings: q0 A B A C C B -> hits 1,3; q1 C C ... -> 1,2; q2 C C B A B A
    # -> hits 3,5.  Recall@1 = 2/3, @4 = 1; MAP@R = (1/2 + 1 + 0)/3 = 0.5.
    gal = np.array([[0.0], [1], [2], [10], [11], [20]], np.float32)
    gl = np.array([0, 1, 0, 2, 2, 1])
    qry = np.array([[0.4], [10.6], [14.6], [5.0]], np.float32)
    ql = np.array([0, 2, 1, 3])
    got = retrieval_metrics(qry, ql, gal, gl, ks=(1, 2, 4), metric="euclidean",
                            devices=jax.devices()[:1])
    expected = {"recall@1": 2 / 3, "recall@2": 2 / 3, "recall@4": 1.0, "p@1": 2 / 3,
                "r_precision": 0.5, "map@r": 0.5, "num_queries": 3,
                "num_excluded_queries": 1, "metric": "euclidean"}
    assert set(got) == set(expected)
    for name, v in expected.items():
        assert got[name] == pytest.approx(v, abs=1e-5) if name != "metric" else got[name] == v


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("self_mode", [True, False])
def test_matches_brute_force_on_tied_random_data(rng, refs, metric, self_mode):
    x = refs.tie_heavy(rng, 90, dim=6, nnz=4)
    lab = rng.integers(0, 12, 90)
    lab[0] = 99  # a singleton class: excluded in self mode
    if self_mode:
        args, ref_args = (x, lab), (x, lab)
    else:
        args = ref_args = (x[:30], lab[:30], x[30:], lab[30:])
    ks = (1, 2, 4, 8, 100)
    got = retrieval_metrics(*args, ks=ks, metric=metric, chunk_size=16,
                            devices=jax.devices()[:1])
    ref = refs.metrics(*ref_args, ks=ks, metric=metric) if self_mode else \
        refs.metrics(ref_args[0], ref_args[1], ref_args[2], ref_args[3], ks, metric)
    for name, v in ref.items():
        assert got[name] == pytest.approx(v, abs=1e-5), name
    assert got["num_excluded_queries"] >= 1


def test_sharded_equals_single_device_metrics(rng):
    x = rng.standard_normal((150, 8)).astype(np.float32)
    lab = rng.integers(0, 10, 150)
    one = retrieval_metrics(x, lab, ks=(1, 4, 16), devices=jax.devices()[:1], chunk_size=64)
    eight = retrieval_metrics(x, lab, ks=(1, 4, 16), shard_threshold=0, chunk_size=32)
    chex.assert_trees_all_equal(one, eight)


def test_perfect_retrieval_is_exactly_one():
    # Each class is a tight cluster around its own axis: every neighbour list
    # starts with all same-class items.
    lab = np.repeat(np.arange(6), 5)
    x = np.eye(8, dtype=np.float32)[lab] * 10 + 0.01 * np.arange(30)[:, None] % 3
    got = retrieval_metrics(x, lab, ks=RECALL_KS["cub200"], devices=jax.devices()[:1])
    for name in ("recall@1", "recall@2", "recall@4", "recall@8", "p@1", "r_precision", "map@r"):
        assert got[name] == 1.0, name
    assert got["num_queries"] == 30 and got["num_excluded_queries"] == 0


def test_argument_errors():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(x, np.zeros(4, int), ks=(0,))
    with pytest.raises(ValueError, match="query_labels"):
        retrieval_metrics(x, np.zeros(4, float))
    with pytest.raises(ValueError, match="gallery_labels"):
        retrieval_metrics(x, np.zeros(4, int), x)
