"""contrastive_loss vs a plain-Python pair loop in float64 (related-methods.md §3.2)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deml_jax.losses import contrastive_loss

# Jitted once per shape: far cheaper on CPU than op-by-op execution.
_loss = jax.jit(contrastive_loss, static_argnames=("margin",))


def ref_contrastive(y, labels, margin, mask=None):
    """(1/n_pairs) sum_{i<k} [pos: 1/2 d^2 | neg: 1/2 max(0, m - d)^2], mean over learners."""
    y = np.asarray(y, np.float64)
    y = y[None] if y.ndim == 2 else y
    rows = [i for i in range(len(labels)) if mask is None or mask[i]]
    pairs = [(i, k) for a, i in enumerate(rows) for k in rows[a + 1:]]
    total = 0.0
    for m in range(y.shape[0]):
        for i, k in pairs:
            u = y[m, i] / np.linalg.norm(y[m, i])
            v = y[m, k] / np.linalg.norm(y[m, k])
            d = np.linalg.norm(u - v)
            if labels[i] == labels[k]:
                total += 0.5 * d * d
            else:
                total += 0.5 * max(0.0, margin - d) ** 2
    return total / max(len(pairs), 1) / y.shape[0]


def num_grad(f, x, h=1e-6):
    """Central finite differences of a float64 NumPy function."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        g[idx] = (f(x + e) - f(x - e)) / (2 * h)
    return g


def _batch(seed, m=0, b=8, d=5, n_classes=3):
    rng = np.random.default_rng(seed)
    shape = (b, d) if m == 0 else (m, b, d)
    y = rng.normal(size=shape).astype(np.float32)
    labels = rng.integers(0, n_classes, size=b).astype(np.int32)
    labels[:2] = labels[0]
    return y, labels


@pytest.mark.parametrize("m", [0, 3])
@pytest.mark.parametrize("margin", [0.5, 1.2])
def test_matches_loop_reference(m, margin):
    y, labels = _batch(m + 1, m=m)
    loss, aux = _loss(jnp.asarray(y), jnp.asarray(labels), margin=margin)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), ref_contrastive(y, labels, margin), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(float(aux["contrastive_pos"] + aux["contrastive_neg"]),
                               float(loss), rtol=1e-5)
    n_pos = sum(labels[i] == labels[k] for i in range(8) for k in range(i + 1, 8))
    assert (float(aux["n_pos"]), float(aux["n_neg"])) == (n_pos, 28 - n_pos)


def test_gradient_matches_finite_differences():
    y, labels = _batch(3, m=2)
    margin = 1.2  # some negatives inside the margin, some outside
    assert 0.0 < ref_contrastive(y, labels, margin) < 10.0
    grad = jax.jit(jax.grad(lambda v: contrastive_loss(v, jnp.asarray(labels), margin=margin)[0]))(
        jnp.asarray(y))
    ref = num_grad(lambda v: ref_contrastive(v, labels, margin), y)
    chex.assert_trees_all_close(np.asarray(grad), ref, rtol=1e-4, atol=1e-6)


def test_permutation_invariance():
    y, labels = _batch(4, m=2)
    perm = np.random.default_rng(0).permutation(8)
    a = _loss(jnp.asarray(y), jnp.asarray(labels), margin=1.0)
    b = _loss(jnp.asarray(y[:, perm]), jnp.asarray(labels[perm]), margin=1.0)
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_positive_pair():
    y, _ = _batch(5)
    labels = np.arange(8, dtype=np.int32)
    f = jax.jit(jax.value_and_grad(
        lambda v: contrastive_loss(v, jnp.asarray(labels), margin=1.5), has_aux=True))
    (loss, aux), grad = f(jnp.asarray(y))
    assert float(aux["contrastive_pos"]) == 0.0 and float(aux["n_pos"]) == 0.0
    np.testing.assert_allclose(float(loss), ref_contrastive(y, labels, 1.5), rtol=2e-5)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_mask_equals_dropping_rows():
    y, labels = _batch(6, m=2, b=10)
    keep = np.ones(10, bool)
    keep[[2, 7]] = False
    f = jax.jit(jax.value_and_grad(
        lambda v, lab, msk: contrastive_loss(v, lab, margin=1.0, mask=msk), has_aux=True))
    (l_mask, aux_mask), g_mask = f(jnp.asarray(y), jnp.asarray(labels), jnp.asarray(keep))
    (l_drop, aux_drop), g_drop = f(jnp.asarray(y[:, keep]), jnp.asarray(labels[keep]), None)
    chex.assert_trees_all_close((l_mask, aux_mask), (l_drop, aux_drop), rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(g_mask[:, keep], g_drop, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_equal(g_mask[:, ~keep], jnp.zeros_like(g_mask[:, ~keep]))
    np.testing.assert_allclose(float(l_mask), ref_contrastive(y, labels, 1.0, keep), rtol=2e-5)


def test_identical_and_zero_vectors_are_finite():
    y, labels = _batch(7)
    y[3] = y[2]          # a (possibly different-class) pair at distance 0
    y[5] = 0.0           # a zero vector
    labels[3] = labels[2] + 1
    f = jax.jit(jax.value_and_grad(lambda v: contrastive_loss(v, jnp.asarray(labels), margin=1.0)[0]))
    loss, grad = f(jnp.asarray(y))
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))


def test_bad_inputs_raise():
    y, labels = _batch(8)
    with pytest.raises(ValueError, match="labels"):
        contrastive_loss(jnp.asarray(y), jnp.asarray(labels[:-1]), margin=1.0)
    with pytest.raises(ValueError, match="embeddings"):
        contrastive_loss(jnp.ones((2, 2, 2, 2)), jnp.asarray(labels[:2]), margin=1.0)
    with pytest.raises(ValueError, match="mask"):
        contrastive_loss(jnp.asarray(y), jnp.asarray(labels), margin=1.0, mask=jnp.ones(8))


def test_bfloat16_input_gives_float32_loss():
    y, labels = _batch(9, m=2)
    y16 = jnp.asarray(y, jnp.bfloat16)
    loss, aux = _loss(y16, jnp.asarray(labels), margin=1.0)
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in aux.values())
    want = ref_contrastive(np.asarray(y16.astype(jnp.float32)), labels, 1.0)
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
