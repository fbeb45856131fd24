"""energy_confusion vs plain-Python pair loops in float64 (related-methods.md §2.2, §2.9)."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deml_jax.losses import energy_confusion


def ref_energy(z, labels, mask=None, weights=None):
    """E = sum_{i<j, l_i != l_j} w_ij 1/2 ||z_i - z_j||^2 / n_neg (w = 1 unless given)."""
    z = np.asarray(z, np.float64)
    rows = [i for i in range(len(labels)) if mask is None or mask[i]]
    negs = [(i, j) for a, i in enumerate(rows) for j in rows[a + 1:] if labels[i] != labels[j]]
    e = 0.0
    for i, j in negs:
        w = 1.0 if weights is None else weights[i, j] + weights[j, i]
        e += w * 0.5 * np.sum((z[i] - z[j]) ** 2)
    return e / len(negs), len(negs)


def num_grad(f, x, h=1e-6):
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        g[idx] = (f(x + e) - f(x - e)) / (2 * h)
    return g


def _batch(seed, b=8, d=5, n_classes=4, scale=1.0):
    rng = np.random.default_rng(seed)
    z = (scale * rng.normal(size=(b, d))).astype(np.float32)
    labels = rng.integers(0, n_classes, size=b).astype(np.int32)
    labels[:2] = labels[0]
    return z, labels


def _ec(z, labels, **kw):
    return jax.jit(lambda v, lab: energy_confusion(v, lab, **kw))(jnp.asarray(z), jnp.asarray(labels))


def test_all_neg_matches_loop_reference():
    z, labels = _batch(0, scale=3.0)
    loss, aux = _ec(z, labels)
    e, n_neg = ref_energy(z, labels)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(aux["ec_energy"]), e, rtol=2e-5)
    np.testing.assert_allclose(float(loss), math.log(e), atol=2e-5)
    assert float(aux["n_neg"]) == float(aux["n_ec_pairs"]) == n_neg


def test_large_offset_is_accurate():
    # An unnormalised branch output far from the origin (pairwise distances ~1).
    z, labels = _batch(1)
    z = z + np.float32(300.0)
    loss, _ = _ec(z, labels)
    np.testing.assert_allclose(float(loss), math.log(ref_energy(z, labels)[0]), atol=1e-4)


def test_gradient_matches_finite_differences():
    # related-methods.md §2.9 (i): a 4-sample batch, 'all_neg'.
    z = np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32)
    labels = np.array([0, 0, 1, 2], np.int32)
    grad = jax.jit(jax.grad(lambda v: energy_confusion(v, jnp.asarray(labels))[0]))(jnp.asarray(z))
    ref = num_grad(lambda v: math.log(ref_energy(v, labels)[0]), z)
    chex.assert_trees_all_close(np.asarray(grad), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("s", [3.7, 0.25])
def test_scaling_z_adds_two_log_s(s):
    # related-methods.md §2.9 (iv).
    z, labels = _batch(3)
    base, _ = _ec(z, labels)
    scaled, _ = _ec(np.float32(s) * z, labels)
    np.testing.assert_allclose(float(scaled) - float(base), 2 * math.log(s), atol=1e-5)


def test_permutation_invariance():
    z, labels = _batch(4)
    perm = np.random.default_rng(0).permutation(8)
    chex.assert_trees_all_close(_ec(z, labels), _ec(z[perm], labels[perm]), rtol=1e-5, atol=1e-6)


def test_no_positive_pair():
    z, _ = _batch(5)
    labels = np.arange(8, dtype=np.int32)
    loss, aux = _ec(z, labels)
    e, n_neg = ref_energy(z, labels)
    assert n_neg == 28 and float(aux["n_neg"]) == 28
    np.testing.assert_allclose(float(loss), math.log(e), atol=2e-5)


@pytest.mark.parametrize("pairs", ["all_neg", "random"])
def test_single_class_gives_zero_and_no_gradient(pairs):
    z, _ = _batch(6)
    labels = np.zeros(8, np.int32)
    f = jax.jit(jax.value_and_grad(lambda v: energy_confusion(
        v, jnp.asarray(labels), pairs=pairs, key=jax.random.key(0))[0]))
    loss, grad = f(jnp.asarray(z))
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)


def test_mask_equals_dropping_rows():
    z, labels = _batch(7, b=10)
    keep = np.ones(10, bool)
    keep[[1, 6]] = False
    f = jax.jit(jax.value_and_grad(
        lambda v, lab, msk: energy_confusion(v, lab, mask=msk), has_aux=True))
    (l_mask, aux_mask), g_mask = f(jnp.asarray(z), jnp.asarray(labels), jnp.asarray(keep))
    (l_drop, aux_drop), g_drop = f(jnp.asarray(z[keep]), jnp.asarray(labels[keep]), None)
    chex.assert_trees_all_close((l_mask, aux_mask), (l_drop, aux_drop), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(g_mask[keep], g_drop, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(g_mask[~keep], jnp.zeros_like(g_mask[~keep]))


def test_random_with_enough_partners_takes_every_negative_from_both_ends():
    # R >= every anchor's negative count: each negative pair is drawn by both anchors.
    z, labels = _batch(8)
    keep = np.ones(8, bool)
    keep[5] = False
    loss, aux = _ec(z, labels, pairs="random", num_partners=20, key=jax.random.key(1),
                    mask=jnp.asarray(keep))
    e, n_neg = ref_energy(z, labels, mask=keep)
    assert float(aux["n_ec_pairs"]) == 2 * n_neg
    np.testing.assert_allclose(float(loss), math.log(2 * e), atol=2e-5)


def test_random_partners_counts_and_expectation():
    z, labels = _batch(9, b=10, n_classes=3)
    r = 3
    neg = labels[:, None] != labels[None, :]
    n_i = neg.sum(1)
    # Anchor i draws min(R, n_i) of its n_i negatives uniformly: each with probability min(R, n_i)/n_i.
    weights = np.where(neg, (np.minimum(r, n_i) / np.maximum(n_i, 1))[:, None], 0.0)
    want, _ = ref_energy(z, labels, weights=weights)
    f = jax.jit(jax.vmap(lambda k: energy_confusion(
        jnp.asarray(z), jnp.asarray(labels), pairs="random", num_partners=r, key=k)[1]))
    aux = f(jax.random.split(jax.random.key(0), 4000))
    assert np.all(np.asarray(aux["n_ec_pairs"]) == np.minimum(r, n_i).sum())
    draws = np.asarray(aux["ec_energy"], np.float64)
    stderr = draws.std() / np.sqrt(len(draws))
    assert stderr > 0 and abs(draws.mean() - want) < 5 * stderr + 1e-6


def test_bad_inputs_raise():
    z, labels = _batch(10)
    with pytest.raises(ValueError, match="key"):
        energy_confusion(jnp.asarray(z), jnp.asarray(labels), pairs="random")
    with pytest.raises(ValueError, match="pairs"):
        energy_confusion(jnp.asarray(z), jnp.asarray(labels), pairs="all")
    with pytest.raises(ValueError, match="z must be"):
        energy_confusion(jnp.ones((2, 8, 5)), jnp.asarray(labels))
    with pytest.raises(ValueError, match="labels"):
        energy_confusion(jnp.asarray(z), jnp.asarray(labels[:-1]))


def test_bfloat16_input_gives_float32_loss():
    z, labels = _batch(11)
    z16 = jnp.asarray(z, jnp.bfloat16)
    loss, aux = jax.jit(energy_confusion)(z16, jnp.asarray(labels))
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in aux.values())
    e, _ = ref_energy(np.asarray(z16.astype(jnp.float32)), labels)
    np.testing.assert_allclose(float(loss), math.log(e), atol=1e-4)


def test_common_offset_gets_no_gradient():
    # related-methods.md §2.2.6 / §2.9 (ii): the bias b of z = W sg(p) + b cancels in z_i - z_j.
    z, labels = _batch(12, scale=2.0)
    g = jax.jit(jax.grad(lambda c: energy_confusion(jnp.asarray(z) + c, jnp.asarray(labels))[0]))(
        jnp.full((5,), 0.7, jnp.float32))
    np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-6)
