"""The small trunk's convolutions (googlenet.conv2d, both kernel modes) vs NumPy loops.

References: direct loops over output positions and taps (forward, input
gradient, kernel gradient), torch's conv2d autograd, and the same trunk built
of flax.linen.Conv (same parameters, outputs and gradients).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from deml_jax.models import kernels
from deml_jax.models.attention import caffe_xavier
from deml_jax.models.googlenet import conv2d
from deml_jax.models.tiny import TinyNet

MODES = ("custom", "native")


def conv3x3(x, k, stride):
    return conv2d(x, k, None, stride=stride, pad=1)


def loop_conv(x, k, stride):
    """y[b, h, w, d] = sum_{i, j, c} pad(x)[b, h*s + i, w*s + j, c] k[i, j, c, d]."""
    b, hh, ww, _ = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    oh, ow = (hh - 1) // stride + 1, (ww - 1) // stride + 1
    y = np.zeros((b, oh, ow, k.shape[3]))
    for h in range(oh):
        for w in range(ow):
            window = xp[:, h * stride:h * stride + 3, w * stride:w * stride + 3, :]
            y[:, h, w] = np.einsum("bijc,ijcd->bd", window, k.astype(np.float64))
    return y


def loop_grads(x, k, dy, stride):
    """Input and kernel gradients of sum(y * dy), accumulated tap by tap."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    dxp = np.zeros_like(xp)
    dk = np.zeros(k.shape)
    for h in range(dy.shape[1]):
        for w in range(dy.shape[2]):
            for i in range(3):
                for j in range(3):
                    hi, wj = h * stride + i, w * stride + j
                    dk[i, j] += np.einsum("bc,bd->cd", xp[:, hi, wj], dy[:, h, w])
                    dxp[:, hi, wj] += dy[:, h, w] @ k[i, j].T.astype(np.float64)
    return dxp[:, 1:-1, 1:-1], dk


CASES = [((2, 6, 6, 3), 4, 1), ((2, 7, 7, 5), 6, 2), ((3, 8, 5, 4), 2, 2), ((1, 5, 9, 2), 3, 3)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,cout,stride", CASES)
def test_forward_and_gradients_match_loops(shape, cout, stride, mode):
    rng = np.random.default_rng(sum(shape) + stride)
    x = rng.normal(size=shape).astype(np.float32)
    k = rng.normal(size=(3, 3, shape[3], cout)).astype(np.float32)
    with kernels.use_kernels(mode):
        y = conv3x3(jnp.asarray(x), jnp.asarray(k), stride)
        dy = rng.normal(size=y.shape).astype(np.float32)
        dx, dk = jax.grad(lambda a, b: jnp.sum(conv3x3(a, b, stride) * dy), argnums=(0, 1))(
            jnp.asarray(x), jnp.asarray(k))
    ref = loop_conv(x, k, stride)
    assert y.shape == ref.shape
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)
    ref_dx, ref_dk = loop_grads(x, k, dy, stride)
    np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dk), ref_dk, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_torch_autograd_under_jit(mode):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, 12, 12, 8)).astype(np.float32)
    k = rng.normal(size=(3, 3, 8, 16)).astype(np.float32)
    loss = lambda a, b: jnp.sum(jnp.tanh(conv3x3(a, b, 2)))
    with kernels.use_kernels(mode):
        dx, dk = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(k))
    tx = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
    tk = torch.tensor(k).permute(3, 2, 0, 1).requires_grad_()  # HWIO -> OIHW
    torch.tanh(torch.nn.functional.conv2d(tx, tk, stride=2, padding=1)).sum().backward()
    np.testing.assert_allclose(np.asarray(dx), tx.grad.permute(0, 2, 3, 1).numpy(),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dk), tk.grad.permute(2, 3, 1, 0).numpy(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_small_trunk_gradients_match_flax_conv_trunk(mode):
    """The whole small trunk (ABE's stage included) against the same net built of nn.Conv:
    same parameter tree and initial values, same outputs and gradients."""

    class ConvTrunk(nn.Module):  # TinyNet with flax's convolution, written out
        @nn.compact
        def __call__(self, x):
            for name, ch, s in (("conv1", 16, 1), ("conv2", 32, 2), ("inception_4a", 64, 1),
                                ("inception_4b", 64, 2), ("inception_5b", 128, 2)):
                x = nn.relu(nn.Conv(ch, (3, 3), strides=s, padding=1, kernel_init=caffe_xavier,
                                    name=name)(x))
            return jnp.mean(x, axis=(1, 2))

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 24, 24, 3)), jnp.float32)
    ours, theirs = TinyNet(abe_stage=True), ConvTrunk()
    params = ours.init(jax.random.PRNGKey(1), x)
    flax_params = theirs.init(jax.random.PRNGKey(1), x)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(flax_params)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(flax_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loss_ours = lambda p: jnp.sum(jnp.tanh(ours.apply(p, x)[0]))
    loss_theirs = lambda p: jnp.sum(jnp.tanh(theirs.apply(p, x)))
    np.testing.assert_allclose(loss_ours(params), loss_theirs(params), rtol=1e-5)
    with kernels.use_kernels(mode):
        g_ours = jax.grad(loss_ours)(params)
    g_theirs = jax.grad(loss_theirs)(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ours),
                            jax.tree_util.tree_leaves(g_theirs)):  # same structure, asserted
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
