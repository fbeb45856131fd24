"""Random-walk attention vs a plain float64 loop reference (docs/reference.md §4 steps 2-4)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deml_jax.ops.random_walk import random_walk_attention


def reference_graph(feat, sigma_ratio=0.15):
    """D and its column sums with Python loops over nodes, float64 (§4 steps 2-3)."""
    h, w, _ = feat.shape
    eps = sigma_ratio * h
    n = h * w
    d = np.zeros((n, n))
    for q in range(n):
        for p in range(n):
            if q == p:
                continue
            rq, cq = divmod(q, w)
            rp, cp = divmod(p, w)
            pairs = zip(feat[rq, cq], feat[rp, cp])
            dist = math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in pairs))
            d[q, p] = dist * math.exp(-((rq - rp) ** 2 + (cq - cp) ** 2) / (2 * eps * eps))
    colsum = [sum(d[q, p] for q in range(n)) for p in range(n)]
    return d, np.array(colsum)


def reference_walk(feat, num_steps, sigma_ratio=0.15):
    d, colsum = reference_graph(feat, sigma_ratio)
    n = d.shape[0]
    m = [1.0 / n] * n
    for _ in range(num_steps):
        m = [sum(d[q, p] / colsum[p] * m[p] for p in range(n)) for q in range(n)]
    return np.array(m).reshape(feat.shape[:2])


def relu_features(rng, shape):
    return np.maximum(rng.normal(size=shape), 0).astype(np.float32)


@pytest.mark.parametrize("hw,steps", [((5, 5), 10), ((4, 6), 3), ((7, 7), 10)])
def test_matches_numpy_loop_reference(hw, steps):
    rng = np.random.default_rng(hw[0] * 10 + hw[1])
    feats = relu_features(rng, (2, *hw, 12))
    got = np.asarray(random_walk_attention(jnp.asarray(feats), steps))
    want = np.stack([reference_walk(f.astype(np.float64), steps) for f in feats])
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-7)
    chex.assert_trees_all_close(got.sum(axis=(1, 2)), np.ones(2), atol=1e-5)


def test_sigma_ratio_changes_the_map():
    rng = np.random.default_rng(1)
    feats = relu_features(rng, (1, 5, 5, 8))
    got = np.asarray(random_walk_attention(jnp.asarray(feats), 10, 0.3))
    chex.assert_trees_all_close(got[0], reference_walk(feats[0].astype(np.float64), 10, 0.3),
                                rtol=1e-4, atol=1e-7)


def test_many_steps_reach_degree_proportional_stationary_distribution():
    rng = np.random.default_rng(2)
    feats = relu_features(rng, (2, 5, 5, 8))
    got = np.asarray(random_walk_attention(jnp.asarray(feats), 2000))
    for b in range(2):
        _, degree = reference_graph(feats[b].astype(np.float64))
        want = (degree / degree.sum()).reshape(5, 5)
        chex.assert_trees_all_close(got[b], want, rtol=1e-3, atol=1e-6)
        converged = np.asarray(random_walk_attention(jnp.asarray(feats[b:b + 1]), converged=True))
        chex.assert_trees_all_close(converged[0], want, rtol=1e-5, atol=1e-8)


def test_ten_steps_are_not_converged():
    """§4 step 4: 10 steps from uniform differ from the stationary map (why we iterate)."""
    rng = np.random.default_rng(3)
    feats = jnp.asarray(relu_features(rng, (1, 7, 7, 16)))
    diff = random_walk_attention(feats, 10) - random_walk_attention(feats, converged=True)
    assert float(jnp.max(jnp.abs(diff))) > 1e-4


@pytest.mark.parametrize("converged", [False, True])
def test_constant_features_give_exact_uniform_without_nan(converged):
    feats = jnp.full((2, 7, 7, 5), 0.7, jnp.float32)
    got = np.asarray(random_walk_attention(feats, converged=converged))
    np.testing.assert_array_equal(got, np.full((2, 7, 7), 1 / 49, np.float32))


def test_gradient_is_finite_on_constant_and_repeated_features():
    """The sqrt guard: zero distances (diagonal, equal positions) give no NaN gradient."""
    rng = np.random.default_rng(4)
    feats = relu_features(rng, (2, 4, 4, 3))
    feats[1] = 1.0
    feats[0, 0, 1] = feats[0, 0, 0]
    weights = jnp.asarray(rng.normal(size=(2, 4, 4)), jnp.float32)
    grad = jax.grad(lambda f: jnp.sum(random_walk_attention(f, 3) * weights))(jnp.asarray(feats))
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_bfloat16_features_close_to_float32():
    rng = np.random.default_rng(5)
    feats = relu_features(rng, (3, 7, 7, 64))
    full = random_walk_attention(jnp.asarray(feats))
    half = random_walk_attention(jnp.asarray(feats, jnp.bfloat16))
    assert half.dtype == jnp.float32
    chex.assert_trees_all_close(half, full, rtol=2e-2, atol=1e-4)


def test_jit_traces_once_for_same_shapes():
    rng = np.random.default_rng(6)
    fn = jax.jit(chex.assert_max_traces(lambda f: random_walk_attention(f, 10), n=1))
    for _ in range(3):
        out = fn(jnp.asarray(relu_features(rng, (2, 7, 7, 8))))
        chex.assert_shape(out, (2, 7, 7))
        chex.assert_trees_all_close(jnp.sum(out, axis=(1, 2)), jnp.ones(2), atol=1e-5)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="features"):
        random_walk_attention(jnp.zeros((7, 7, 4)))
    with pytest.raises(TypeError, match="floating"):
        random_walk_attention(jnp.zeros((1, 7, 7, 4), jnp.int32))
