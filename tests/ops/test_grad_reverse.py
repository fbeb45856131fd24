"""Gradient reversal and the DANN schedule vs hand-worked references (§9.1)."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deml_jax.ops.grad_reverse import dann_lambda, gradient_reversal


def _cubic(x):
    return jnp.sum(x ** 3)  # d/dx = 3 x^2, known by hand


def test_forward_is_identity():
    x = jnp.arange(12.0).reshape(3, 4)
    chex.assert_trees_all_equal(gradient_reversal(x, 0.7), x)


@pytest.mark.parametrize("scale", [0.0, 0.3, 1.0, 2.5])
def test_grad_is_minus_scale_times_identity_grad(scale):
    x = jnp.linspace(-1.0, 2.0, 10).reshape(2, 5)
    g = jax.grad(lambda v: _cubic(gradient_reversal(v, scale)))(x)
    expected = -scale * 3.0 * np.asarray(x) ** 2
    chex.assert_trees_all_close(g, expected, rtol=1e-5, atol=1e-5)


def test_scale_gets_zero_cotangent():
    x = jnp.ones((3,))
    g_scale = jax.grad(lambda s: _cubic(gradient_reversal(x * 2.0, s)))(0.5)
    chex.assert_trees_all_equal(g_scale, jnp.zeros((), jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_cotangent_keeps_input_dtype(dtype):
    x = jnp.asarray([0.5, -1.0, 2.0], dtype)
    g = jax.grad(lambda v: jnp.sum(gradient_reversal(v, 0.5).astype(jnp.float32) * 4.0))(x)
    assert g.dtype == dtype
    chex.assert_trees_all_close(g.astype(jnp.float32), jnp.full((3,), -2.0))


def test_pytree_input():
    tree = {"a": jnp.ones((2,)), "b": (jnp.full((3,), 2.0),)}
    loss = lambda t: jnp.sum(t["a"]) + jnp.sum(t["b"][0] ** 2)
    g = jax.grad(lambda t: loss(gradient_reversal(t, 2.0)))(tree)
    chex.assert_trees_all_close(g, {"a": -2.0 * jnp.ones((2,)),
                                    "b": (-2.0 * 4.0 * jnp.ones((3,)),)})


def test_changing_scale_under_jit_does_not_retrace():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, scale):
        return jax.grad(lambda v: _cubic(gradient_reversal(v, scale)))(x)

    chex.clear_trace_counter()
    x = jnp.ones((4,))
    for scale in [0.0, 0.1, 0.5, 0.99]:
        out = step(x, jnp.float32(scale))
        chex.assert_trees_all_close(out, -3.0 * scale * np.ones(4), atol=1e-5)


def test_bad_inputs():
    with pytest.raises(TypeError, match="floating"):
        gradient_reversal(jnp.arange(3), 1.0)
    with pytest.raises(ValueError, match="scalar"):
        gradient_reversal(jnp.ones(3), jnp.ones(2))
    with pytest.raises(ValueError, match="total_steps"):
        dann_lambda(1, 0)


def _dann_by_hand(progress, max_iter, gamma=10.0, iter_size=1):
    p = min(progress, 100000) / (iter_size * max_iter)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def test_dann_lambda_endpoints_and_values():
    assert float(dann_lambda(0, 1000)) == 0.0
    assert abs(float(dann_lambda(10**9, 1000)) - 1.0) < 1e-6
    for step, total, gamma, iter_size in [(1, 10000, 10.0, 1), (250, 1000, 10.0, 1),
                                          (1000, 1000, 10.0, 1), (300, 200, 5.0, 2),
                                          (150000, 20000, 10.0, 1)]:
        got = float(dann_lambda(step, total, gamma=gamma, iter_size=iter_size))
        assert abs(got - _dann_by_hand(step, total, gamma, iter_size)) < 1e-6
    # Caffe caps the counter at 100000: with max_iter 10^6, p stops at 0.1.
    assert abs(float(dann_lambda(500000, 10**6)) - _dann_by_hand(100000, 10**6)) < 1e-6
    assert float(dann_lambda(500000, 10**6)) < 0.5


def test_dann_lambda_traced_step():
    f = jax.jit(lambda s: dann_lambda(s, 1000))
    vals = np.array([float(f(jnp.int32(s))) for s in (0, 100, 400)])
    ref = np.array([_dann_by_hand(s, 1000) for s in (0, 100, 400)])
    chex.assert_trees_all_close(vals, ref, atol=1e-5)
