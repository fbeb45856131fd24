"""RetrievalEvaluator: each image once (masks, duplicated padding, hosts)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deml_jax.evaluation.evaluator import RetrievalEvaluator, embed_split, gather_examples

N, D, H = 37, 6, 4


def _dataset(seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, N)
    # Small-integer pixels and weights: the embeddings are exact in float32
    # whatever the batch shape, so results can be compared bit for bit.
    images = rng.integers(-3, 4, (N, H, H, 3)).astype(np.float32)
    return images, labels


def _embed(images):  # [..., H, W, 3] -> [..., D], leading dims kept
    flat = images.reshape(images.shape[:-3] + (-1,))
    w = jnp.asarray(np.random.default_rng(42).integers(-2, 3, (H * H * 3, D)), jnp.float32)
    return jnp.dot(flat, w, precision="highest")


def _batches(images, labels, order, lead=(2, 3), pad_with_duplicates=True):
    """Ordered batches with leading dims ``lead``; padding repeats real rows."""
    per = int(np.prod(lead))
    for s in range(0, len(order), per):
        sel = order[s:s + per]
        n = len(sel)
        fill = np.concatenate([sel, np.resize(sel if pad_with_duplicates else [0], per - n)])
        mask = np.arange(per) < n
        yield {"image": images[fill].reshape(lead + images.shape[1:]),
               "label": labels[fill].reshape(lead), "mask": mask.reshape(lead),
               "index": fill.reshape(lead)}


@pytest.mark.parametrize("dup", [True, False])
def test_each_image_once_whatever_the_padding(dup):
    images, labels = _dataset()
    split = {"test": lambda: _batches(images, labels, np.arange(N), pad_with_duplicates=dup)}
    ev = RetrievalEvaluator(_embed, split,
                            ks=(1, 2), devices=jax.devices()[:1], clustering=False, prefix="t/")
    got = ev.run()
    ref_emb = np.asarray(_embed(images))
    chex.assert_trees_all_close(ev.last["test"]["embeddings"], ref_emb, rtol=0)
    chex.assert_trees_all_equal(ev.last["test"]["indices"], np.arange(N))
    from deml_jax.evaluation.metrics import retrieval_metrics
    direct = retrieval_metrics(ref_emb, labels, ks=(1, 2), devices=jax.devices()[:1])
    for k in ("recall@1", "recall@2", "map@r", "num_queries", "num_excluded_queries"):
        assert got["t/" + k] == pytest.approx(direct[k], abs=1e-5)
    assert got["t/eval_time_s"] > 0 and "t/metric" not in got


def test_two_hosts_with_shuffled_duplicated_rows_equal_one_host():
    images, labels = _dataset(1)
    perm = np.random.default_rng(5).permutation(N)
    # host 0 gets 20 rows + 3 rows also on host 1; host 1 the rest (uneven)
    parts = [np.concatenate([perm[:20], perm[25:28]]), perm[20:]]
    local = [embed_split(_embed, _batches(images, labels, p), split="test",
                         allgather=lambda t: jax.tree.map(lambda x: np.asarray(x)[None], t))
             for p in parts]

    n_max = max(len(l["indices"]) for l in local)

    def host_tree(l):
        pad = n_max - len(l["indices"])
        return {"emb": np.pad(l["embeddings"], ((0, pad), (0, 0))),
                "label": np.pad(l["labels"], (0, pad)), "index": np.pad(l["indices"], (0, pad)),
                "valid": np.arange(n_max) < len(l["indices"])}

    def allgather(tree):
        if isinstance(tree, np.ndarray):  # the row counts
            return np.array([[len(l["indices"])] for l in local])
        return jax.tree.map(lambda *xs: np.stack(xs), *[host_tree(l) for l in local])

    emb, lab, idx = gather_examples(local[0]["embeddings"], local[0]["labels"],
                                    local[0]["indices"], allgather)
    chex.assert_trees_all_equal(idx, np.arange(N))
    chex.assert_trees_all_equal(lab, labels)
    chex.assert_trees_all_close(emb, np.asarray(_embed(images)), rtol=0)


def test_query_gallery_mode_and_split_checks():
    images, labels = _dataset(2)
    qi, gi = np.arange(0, 10), np.arange(10, N)
    splits = {"query": lambda: _batches(images, labels, qi, lead=(4,)),
              "gallery": lambda: _batches(images, labels, gi, lead=(8,))}
    ev = RetrievalEvaluator(_embed, splits, mode="query_gallery", ks=(1, 5),
                            devices=jax.devices()[:1])
    got = ev.run()
    assert got["num_queries"] + got["num_excluded_queries"] == 10
    assert 0.0 <= got["nmi"] <= 1.0 and 0.0 <= got["f1"] <= 1.0
    with pytest.raises(ValueError, match="needs splits"):
        RetrievalEvaluator(_embed, {"test": None}, mode="query_gallery")
    bad = RetrievalEvaluator(_embed, {"test": lambda: [{"image": images[:2]}]})
    with pytest.raises(ValueError, match="lacks keys"):
        bad.run()


@pytest.mark.parametrize("labels, why", [(np.zeros(N, int), "1 class"),
                                         (np.arange(N), f"0 of {N} queries")])
def test_degenerate_split_raises_or_warns_with_null_metrics(labels, why, capsys):
    from deml_jax.evaluation.metrics import DegenerateEvaluationError
    images, _ = _dataset()
    split = {"test": lambda: _batches(images, labels, np.arange(N))}
    kw = dict(ks=(1, 2), devices=jax.devices()[:1], clustering=True, prefix="val/")
    with pytest.raises(DegenerateEvaluationError, match=why):
        RetrievalEvaluator(_embed, split, **kw).run()
    got = RetrievalEvaluator(_embed, split, on_degenerate="warn", **kw).run()
    for k in ("recall@1", "recall@2", "p@1", "r_precision", "map@r", "nmi", "f1"):
        assert got["val/" + k] is None, k  # never a fake 1.0 or NaN
    valid = N if why == "1 class" else 0  # one class: every query has relevant items
    assert got["val/num_queries"] == valid
    assert got["val/num_excluded_queries"] == N - valid
    err = capsys.readouterr().err
    assert "WARNING" in err and why in err
