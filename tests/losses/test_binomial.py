"""binomial_deviance vs plain-Python pair loops in float64 (docs/reference.md §5.1)."""
import math

import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from deml_jax.losses import binomial_deviance

DEML = dict(alpha=2.0, beta=0.5, cost_pos=1.0, cost_neg=35.0, shrinkage=0.06)
U512 = dict(alpha=2.0, beta=0.5, cost_pos=1.0, cost_neg=25.0, shrinkage=0.06)


def _pairs(labels):
    b = len(labels)
    pairs = [(i, k) for i in range(b) for k in range(i + 1, b)]
    n_pos = sum(1 for i, k in pairs if labels[i] == labels[k])
    return pairs, n_pos, len(pairs) - n_pos


def _cos(u, v):
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def ref_binomial(y, labels, alpha, beta, cost_pos, cost_neg, shrinkage):
    """Loss (gradient-defining form), its two halves and the display value, by loops."""
    y = np.asarray(y, np.float64)
    y = y[None] if y.ndim == 2 else y
    pairs, n_pos, n_neg = _pairs(labels)
    out = {"pos": 0.0, "neg": 0.0, "display": 0.0}
    for i, k in pairs:
        same = labels[i] == labels[k]
        g = -alpha * cost_pos if same else alpha * cost_neg
        w = n_pos if same else n_neg
        s = 0.5
        for m in range(y.shape[0]):
            c = _cos(y[m, i], y[m, k])
            out["pos" if same else "neg"] += math.log1p(math.exp(g * (c - beta))) / w / y.shape[0]
            s += shrinkage * (-g) * (c - beta)
        out["display"] += math.log1p(math.exp(-s)) / w
    return out


def ref_grad_caffe(y, labels, alpha, beta, cost_pos, cost_neg):
    """The diff BinomialLoss::Forward_cpu writes, transcribed pair by pair."""
    y = np.asarray(y, np.float64)
    grad = np.zeros_like(y)
    n_learners = y.shape[0]
    pairs, n_pos, n_neg = _pairs(labels)
    for i, k in pairs:
        same = labels[i] == labels[k]
        g = -alpha * cost_pos if same else alpha * cost_neg
        w = n_pos if same else n_neg
        for m in range(n_learners):
            yi, yk = y[m, i], y[m, k]
            ni, nk = np.linalg.norm(yi), np.linalg.norm(yk)
            c = np.dot(yi, yk) / (ni * nk)
            ans = math.exp(g * (c - beta))
            coef = g * ans / (w * (1.0 + ans)) / n_learners
            grad[m, i] += coef * (yk / (ni * nk) - c * yi / ni**2)
            grad[m, k] += coef * (yi / (ni * nk) - c * yk / nk**2)
    return grad


def _batch(seed, m=3, b=10, d=6, n_classes=4):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(m, b, d)).astype(np.float32)
    labels = rng.integers(0, n_classes, size=b).astype(np.int32)
    labels[:2] = labels[0]  # at least one positive pair
    return y, labels


@pytest.mark.parametrize("cfg", [DEML, U512], ids=["cost_neg35", "cost_neg25"])
@pytest.mark.parametrize("m", [0, 1, 3])  # 0 = plain [B, D]
def test_matches_loop_reference(cfg, m):
    y, labels = _batch(m + 7, m=max(m, 1))
    y = y[0] if m == 0 else y
    loss, aux = binomial_deviance(jnp.asarray(y), jnp.asarray(labels), **cfg)
    ref = ref_binomial(y, labels, **cfg)
    _, n_pos, n_neg = _pairs(labels)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), ref["pos"] + ref["neg"], rtol=2e-5)
    np.testing.assert_allclose(float(aux["binomial_pos"]), ref["pos"], rtol=2e-5)
    np.testing.assert_allclose(float(aux["binomial_neg"]), ref["neg"], rtol=2e-5)
    np.testing.assert_allclose(float(aux["binomial_display"]), ref["display"], rtol=2e-5)
    assert (float(aux["n_pos"]), float(aux["n_neg"])) == (n_pos, n_neg)


def test_mean_cosines_match_loop():
    y, labels = _batch(3)
    _, aux = binomial_deviance(jnp.asarray(y), jnp.asarray(labels))
    pairs, _, _ = _pairs(labels)
    pos = [np.mean([_cos(y[m, i], y[m, k]) for m in range(3)])
           for i, k in pairs if labels[i] == labels[k]]
    neg = [np.mean([_cos(y[m, i], y[m, k]) for m in range(3)])
           for i, k in pairs if labels[i] != labels[k]]
    np.testing.assert_allclose(float(aux["mean_pos_cos"]), np.mean(pos), atol=1e-5)
    np.testing.assert_allclose(float(aux["mean_neg_cos"]), np.mean(neg), atol=1e-5)


@pytest.mark.parametrize("cfg", [DEML, U512], ids=["cost_neg35", "cost_neg25"])
def test_gradient_equals_caffe_backward(cfg):
    y, labels = _batch(11)
    f = jax.jit(jax.grad(lambda v: binomial_deviance(v, jnp.asarray(labels), **cfg)[0]))
    grad = f(jnp.asarray(y))
    ref = ref_grad_caffe(y, labels, cfg["alpha"], cfg["beta"], cfg["cost_pos"], cfg["cost_neg"])
    chex.assert_trees_all_close(np.asarray(grad), ref, rtol=1e-4, atol=1e-6)


def test_check_grads_float64():
    y, labels = _batch(5, b=6, d=4, n_classes=3)
    with jax.enable_x64(True):
        f = jax.jit(lambda v: binomial_deviance(v, jnp.asarray(labels), **DEML)[0])
        jax.test_util.check_grads(f, (jnp.asarray(y, jnp.float64),), order=1,
                                  modes=["rev"], eps=1e-6)


def test_permutation_invariance():
    y, labels = _batch(21)
    perm = np.random.default_rng(0).permutation(len(labels))
    a, aux_a = binomial_deviance(jnp.asarray(y), jnp.asarray(labels), **DEML)
    b, aux_b = binomial_deviance(jnp.asarray(y[:, perm]), jnp.asarray(labels[perm]), **DEML)
    chex.assert_trees_all_close((a, aux_a), (b, aux_b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("labels", [np.arange(8), np.zeros(8)], ids=["no_pos", "no_neg"])
def test_missing_pair_type_is_finite(labels):
    labels = labels.astype(np.int32)
    y, _ = _batch(2, b=8)
    f = jax.jit(jax.value_and_grad(
        lambda v: binomial_deviance(v, jnp.asarray(labels), **DEML), has_aux=True))
    (loss, aux), grad = f(jnp.asarray(y))
    ref = ref_binomial(y, labels, **DEML)
    missing = "binomial_pos" if labels[1] != labels[0] else "binomial_neg"
    assert float(aux[missing]) == 0.0
    np.testing.assert_allclose(float(loss), ref["pos"] + ref["neg"], rtol=2e-5)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
    for v in aux.values():
        assert np.isfinite(float(v))


def test_mask_equals_dropping_rows():
    y, labels = _batch(9, b=12)
    keep = np.ones(12, bool)
    keep[[3, 7, 11]] = False
    f = jax.jit(jax.value_and_grad(
        lambda v, lab, msk: binomial_deviance(v, lab, mask=msk, **DEML), has_aux=True))
    (l_mask, aux_mask), g_mask = f(jnp.asarray(y), jnp.asarray(labels), jnp.asarray(keep))
    (l_drop, aux_drop), g_drop = f(jnp.asarray(y[:, keep]), jnp.asarray(labels[keep]), None)
    chex.assert_trees_all_close((l_mask, aux_mask), (l_drop, aux_drop), rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(g_mask[:, keep], g_drop, rtol=1e-5, atol=1e-8)
    chex.assert_trees_all_equal(g_mask[:, ~keep], jnp.zeros_like(g_mask[:, ~keep]))


def test_bfloat16_input_gives_float32_loss():
    y, labels = _batch(13)
    y16 = jnp.asarray(y, jnp.bfloat16)
    loss16, aux16 = binomial_deviance(y16, jnp.asarray(labels), **DEML)
    ref = ref_binomial(np.asarray(y16.astype(jnp.float32)), labels, **DEML)
    loss32, _ = binomial_deviance(jnp.asarray(y), jnp.asarray(labels), **DEML)
    assert loss16.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in aux16.values())
    np.testing.assert_allclose(float(loss16), ref["pos"] + ref["neg"], rtol=1e-4)
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=5e-2)
    grad = jax.grad(lambda v: binomial_deviance(v, jnp.asarray(labels))[0])(y16)
    assert grad.dtype == jnp.bfloat16


def test_zero_vector_is_safe_and_jittable():
    y, labels = _batch(4)
    y[1, 2] = 0.0
    f = jax.jit(jax.value_and_grad(lambda v: binomial_deviance(v, jnp.asarray(labels))[0]))
    loss, grad = f(jnp.asarray(y))
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))


def test_bad_inputs_raise():
    y, labels = _batch(1)
    with pytest.raises(ValueError, match="labels"):
        binomial_deviance(jnp.asarray(y), jnp.asarray(labels[:-1]))
    with pytest.raises(ValueError, match="labels"):
        binomial_deviance(jnp.asarray(y), jnp.asarray(labels, jnp.float32))
    with pytest.raises(ValueError, match="embeddings"):
        binomial_deviance(jnp.ones((2, 2, 2, 2)), jnp.asarray(labels[:2]))
    with pytest.raises(TypeError, match="embeddings"):
        binomial_deviance(jnp.ones((10, 3), jnp.int32), jnp.asarray(labels))
    with pytest.raises(ValueError, match="mask"):
        binomial_deviance(jnp.asarray(y), jnp.asarray(labels), mask=jnp.ones(10))
