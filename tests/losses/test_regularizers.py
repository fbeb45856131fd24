"""Activation loss and row-norm penalty vs loops and the §5.3 gradient formula."""
import chex
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from deml_jax.losses import activation_loss, row_norm_penalty


def ref_act(z, mask=None):
    """Caffe ActLoss, one bottom: (1/N) sum_n ||z_n||^2 / C over valid rows."""
    z = np.asarray(z, np.float64)
    rows = [n for n in range(z.shape[0]) if mask is None or mask[n]]
    return sum(np.sum(z[n] ** 2) / z.shape[1] for n in rows) / len(rows)


def _kernel(seed, n_in=9, n_out=4):
    # A Flax Dense kernel [in, out]: Caffe's rows w_r are its columns.
    return np.random.default_rng(seed).normal(scale=0.4, size=(n_in, n_out)).astype(np.float32)


def test_activation_loss_matches_loop_and_caffe_gradient():
    z = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    (loss, aux), grad = jax.value_and_grad(activation_loss, has_aux=True)(jnp.asarray(z))
    np.testing.assert_allclose(float(loss), ref_act(z), rtol=1e-5)
    np.testing.assert_allclose(float(aux["act"]), ref_act(z), rtol=1e-5)
    # act_loss.cpp backward with M = 1: 2 / (N C) * z_n.
    chex.assert_trees_all_close(np.asarray(grad), 2.0 / (6 * 5) * z, rtol=1e-5, atol=1e-5)


def test_activation_loss_mask_and_bf16():
    z = np.random.default_rng(1).normal(size=(7, 3)).astype(np.float32)
    mask = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    loss, _ = activation_loss(jnp.asarray(z), mask=jnp.asarray(mask))
    np.testing.assert_allclose(float(loss), ref_act(z, mask), rtol=1e-5)
    loss16, _ = activation_loss(jnp.asarray(z, jnp.bfloat16))
    assert loss16.dtype == jnp.float32
    np.testing.assert_allclose(float(loss16), ref_act(z), rtol=2e-2)


@pytest.mark.parametrize("lam", [0.5, 100.0])
def test_row_norm_penalty_matches_loop(lam):
    w = _kernel(2)
    n_out = w.shape[1]
    want = lam / n_out * sum((np.sum(w[:, r].astype(np.float64) ** 2) - 1.0) ** 2
                             for r in range(n_out))
    np.testing.assert_allclose(float(row_norm_penalty(jnp.asarray(w), lam=lam)), want, rtol=1e-5)


def test_row_norm_penalty_gradient_is_caffe_act_init():
    w = _kernel(3)
    lam, n_out = 0.5, w.shape[1]
    grad = jax.grad(lambda k: row_norm_penalty(k, lam=lam))(jnp.asarray(w))
    # inner_product_layer.cu: diff[r, :] += 4 (lam / N_out) (||w_r||^2 - 1) w_r
    ref = np.zeros_like(w, dtype=np.float64)
    for r in range(n_out):
        ref[:, r] = 4 * lam / n_out * (np.sum(w[:, r].astype(np.float64) ** 2) - 1.0) * w[:, r]
    chex.assert_trees_all_close(np.asarray(grad), ref, rtol=1e-5, atol=1e-7)
    # Unit-norm columns are a stationary point with zero penalty.
    unit = w / np.linalg.norm(w, axis=0, keepdims=True)
    assert abs(float(row_norm_penalty(jnp.asarray(unit)))) < 1e-10


def test_check_grads_float64():
    with jax.enable_x64(True):
        z = jnp.asarray(np.random.default_rng(4).normal(size=(4, 3)))
        jax.test_util.check_grads(lambda v: activation_loss(v)[0], (z,), order=1,
                                  modes=["rev"], eps=1e-6)
        w = jnp.asarray(_kernel(5, 5, 3), jnp.float64)
        jax.test_util.check_grads(row_norm_penalty, (w,), order=1, modes=["rev"], eps=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="z"):
        activation_loss(jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="kernel"):
        row_norm_penalty(jnp.ones((3,)))
    with pytest.raises(TypeError, match="kernel"):
        row_norm_penalty(jnp.ones((3, 3), jnp.int32))
