"""triplet_loss vs plain-Python triplet loops in float64 (related-methods.md §2.5)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deml_jax.losses import triplet_loss

# Jitted once per shape: far cheaper on CPU than op-by-op execution.
_loss = jax.jit(triplet_loss, static_argnames=("margin", "negatives"))


def _unit(v):
    return v / np.linalg.norm(v)


def ref_triplet(y, labels, margin, negatives="hard", mask=None):
    """Mean over (a, p), a != p same class, of [m - s_ap + s_an]_+.

    hard: n = the anchor's most similar negative. "expected": the mean over the
    anchor's negatives (the expectation of the random choice).
    """
    y = np.asarray(y, np.float64)
    y = y[None] if y.ndim == 2 else y
    rows = [i for i in range(len(labels)) if mask is None or mask[i]]
    total, count = 0.0, 0
    for a in rows:
        negs = [n for n in rows if labels[n] != labels[a]]
        for p in rows:
            if p == a or labels[p] != labels[a] or not negs:
                continue
            count += 1
            for m in range(y.shape[0]):
                s = lambda i, k: float(np.dot(_unit(y[m, i]), _unit(y[m, k])))
                if negatives == "hard":
                    s_an = max(s(a, n) for n in negs)
                    total += max(0.0, margin - s(a, p) + s_an) / y.shape[0]
                else:
                    total += np.mean([max(0.0, margin - s(a, p) + s(a, n))
                                      for n in negs]) / y.shape[0]
    return total / max(count, 1), count


def num_grad(f, x, h=1e-6):
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        g[idx] = (f(x + e) - f(x - e)) / (2 * h)
    return g


def _batch(seed, m=0, b=8, d=5, n_classes=3):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(b, d) if m == 0 else (m, b, d)).astype(np.float32)
    labels = rng.integers(0, n_classes, size=b).astype(np.int32)
    labels[:2] = labels[0]
    labels[2] = labels[0] + 1
    return y, labels


@pytest.mark.parametrize("m", [0, 2])
def test_hard_matches_loop_reference(m):
    y, labels = _batch(m + 10, m=m)
    loss, aux = _loss(jnp.asarray(y), jnp.asarray(labels), margin=0.3)
    want, count = ref_triplet(y, labels, 0.3)
    assert loss.dtype == jnp.float32 and float(aux["n_triplets"]) == count
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-7)


def test_hard_gradient_matches_finite_differences():
    y, labels = _batch(11, m=2)
    grad = jax.jit(jax.grad(lambda v: triplet_loss(v, jnp.asarray(labels), margin=0.5)[0]))(
        jnp.asarray(y))
    ref = num_grad(lambda v: ref_triplet(v, labels, 0.5)[0], y)
    assert np.abs(ref).max() > 1e-3
    chex.assert_trees_all_close(np.asarray(grad), ref, rtol=1e-4, atol=1e-6)


def test_random_with_one_negative_per_anchor_is_deterministic():
    # Classes {0: 3 rows, 1: 1 row}: every anchor of class 0 has exactly one negative.
    rng = np.random.default_rng(12)
    y = rng.normal(size=(4, 5)).astype(np.float32)
    labels = np.array([0, 0, 0, 1], np.int32)
    for seed in range(3):
        loss, aux = _loss(jnp.asarray(y), jnp.asarray(labels), margin=0.4,
                                 negatives="random", key=jax.random.key(seed))
        want, count = ref_triplet(y, labels, 0.4, "expected")
        assert float(aux["n_triplets"]) == count == 6
        np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("masked", [False, True])
def test_random_expectation_matches_loop(masked):
    y, labels = _batch(13, b=10)
    keep = np.ones(10, bool)
    if masked:
        keep[[3, 8]] = False
        y[3] = y[0]  # would be the hardest "negative" if a masked row could be drawn
    f = jax.jit(jax.vmap(lambda k: triplet_loss(
        jnp.asarray(y), jnp.asarray(labels), margin=0.6, negatives="random", key=k,
        mask=jnp.asarray(keep))[0]))
    draws = np.asarray(f(jax.random.split(jax.random.key(0), 4000)), np.float64)
    want, _ = ref_triplet(y, labels, 0.6, "expected", mask=keep)
    stderr = draws.std() / np.sqrt(len(draws))
    assert stderr > 0
    assert abs(draws.mean() - want) < 5 * stderr + 1e-6


def test_random_needs_a_key_and_valid_option():
    y, labels = _batch(14)
    with pytest.raises(ValueError, match="key"):
        triplet_loss(jnp.asarray(y), jnp.asarray(labels), negatives="random")
    with pytest.raises(ValueError, match="negatives"):
        triplet_loss(jnp.asarray(y), jnp.asarray(labels), negatives="semihard")


def test_permutation_invariance_hard():
    y, labels = _batch(15, m=2)
    perm = np.random.default_rng(1).permutation(8)
    a = _loss(jnp.asarray(y), jnp.asarray(labels), margin=0.3)
    b = _loss(jnp.asarray(y[:, perm]), jnp.asarray(labels[perm]), margin=0.3)
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("negatives", ["hard", "random"])
def test_no_positive_pair_gives_zero(negatives):
    y, _ = _batch(16)
    labels = np.arange(8, dtype=np.int32)
    f = jax.jit(jax.value_and_grad(lambda v: triplet_loss(
        v, jnp.asarray(labels), negatives=negatives, key=jax.random.key(0)), has_aux=True))
    (loss, aux), grad = f(jnp.asarray(y))
    assert float(loss) == 0.0 and float(aux["n_triplets"]) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_single_class_gives_zero():
    y, _ = _batch(17)
    loss, aux = _loss(jnp.asarray(y), jnp.zeros(8, jnp.int32))
    assert float(loss) == 0.0 and float(aux["n_triplets"]) == 0.0


def test_mask_equals_dropping_rows_hard():
    y, labels = _batch(18, m=2, b=10)
    keep = np.ones(10, bool)
    keep[[4, 9]] = False
    f = jax.jit(jax.value_and_grad(
        lambda v, lab, msk: triplet_loss(v, lab, margin=0.3, mask=msk), has_aux=True))
    (l_mask, aux_mask), g_mask = f(jnp.asarray(y), jnp.asarray(labels), jnp.asarray(keep))
    (l_drop, aux_drop), g_drop = f(jnp.asarray(y[:, keep]), jnp.asarray(labels[keep]), None)
    chex.assert_trees_all_close((l_mask, aux_mask), (l_drop, aux_drop), rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(g_mask[:, keep], g_drop, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_equal(g_mask[:, ~keep], jnp.zeros_like(g_mask[:, ~keep]))
