"""Platform-aware kernels: 'custom' (CPU-tuned gradients) vs 'native' (XLA's own).

Both paths must give the same values and gradients (fp32); the reference for
each is the other path here, and each is separately pinned to torch in
test_googlenet.py ('custom' is what runs on CPU by default).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deml_jax.models import googlenet as G
from deml_jax.models import kernels


def test_auto_picks_custom_on_cpu_native_elsewhere(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.resolve("cpu") == "custom"
    assert kernels.resolve("gpu") == "native"
    assert kernels.resolve("cuda") == "native"
    assert kernels.resolve("tpu") == "native"


def test_env_and_config_overrides(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "native")
    assert kernels.resolve("cpu") == "native"
    with kernels.use_kernels("custom"):  # config / explicit choice beats the env
        assert kernels.resolve("gpu") == "custom"
    assert kernels.resolve("cpu") == "native"
    monkeypatch.setenv(kernels.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="DEML_JAX_KERNELS='fast'"):
        kernels.resolve("cpu")
    with pytest.raises(ValueError, match="config.model.kernels='fast'"):
        kernels.set_kernels("fast")


def _grads(mode, fn, *args):
    with kernels.use_kernels(mode):  # a fresh jit traces under the chosen mode
        return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)


@pytest.mark.parametrize("hw,cin,cout,k,s,p", [(13, 3, 5, 7, 2, 3), (9, 12, 6, 3, 1, 1),
                                               (8, 10, 4, 5, 1, 2), (6, 9, 7, 1, 1, 0)])
def test_conv2d_paths_agree(hw, cin, cout, k, s, p):
    rng = np.random.default_rng(hw + cin)
    x = jnp.asarray(rng.normal(size=(2, hw, hw, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(cout,)), jnp.float32)
    oh = (hw + 2 * p - k) // s + 1
    v = jnp.asarray(rng.normal(size=(2, oh, oh, cout)), jnp.float32)
    fn = lambda x, w, b: jnp.sum(G.conv2d(x, w, b, stride=s, pad=p) * v)
    custom, native = _grads("custom", fn, x, w, b), _grads("native", fn, x, w, b)
    chex.assert_trees_all_close(custom, native, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hw,k,s,p", [(9, 3, 2, 0), (8, 3, 1, 1), (14, 2, 2, 0), (10, 3, 2, 1)])
def test_max_pool_paths_agree_without_ties(hw, k, s, p):
    rng = np.random.default_rng(hw * 7 + k)
    x = jnp.asarray(rng.normal(size=(2, hw, hw, 5)), jnp.float32)  # continuous: no ties
    oh = G.ceil_pool_padding(hw, k, s, p)[0]
    v = jnp.asarray(rng.normal(size=(2, oh, oh, 5)), jnp.float32)
    fn = lambda x: jnp.sum(G.max_pool_ceil(x, k, s, p) * v)
    chex.assert_trees_all_close(_grads("custom", fn, x), _grads("native", fn, x),
                                rtol=1e-5, atol=1e-5)


def test_full_bvlc_trunk_gradients_agree():
    """Every parameter gradient and the input gradient of the whole BVLC trunk."""
    model = G.GoogLeNet(variant="bvlc")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 67, 67, 3)) * 50, jnp.float32)
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    v = jnp.asarray(np.random.default_rng(1).normal(size=(2, 1024)), jnp.float32)
    fn = lambda p, x: jnp.sum(model.apply({"params": p}, x)[0] * v)
    (lc, gc), (ln, gn) = _grads("custom", fn, params, x), _grads("native", fn, params, x)
    chex.assert_trees_all_close(lc, ln, rtol=1e-5, atol=1e-5)
    # Compare relative to each array's scale (gradients span many magnitudes).
    scale = jax.tree.map(lambda g: float(jnp.max(jnp.abs(g))) + 1e-12, gn)
    chex.assert_trees_all_close(jax.tree.map(lambda g, s: g / s, gc, scale),
                                jax.tree.map(lambda g, s: g / s, gn, scale), atol=2e-5, rtol=0)


def test_modes_really_switch_the_gradient_kernels():
    """'native' differentiates XLA's ops; 'custom' goes through our VJPs."""
    x = jnp.ones((1, 9, 9, 4), jnp.float32)
    w = jnp.ones((3, 3, 4, 2), jnp.float32)
    fn = lambda x, w: jnp.sum(G.conv2d(G.max_pool_ceil(x, 3, 2), w, None, stride=1, pad=1))
    jaxprs = {}
    for mode in ("custom", "native"):
        with kernels.use_kernels(mode):
            jaxprs[mode] = str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(x, w))
    assert "select_and_scatter_add" in jaxprs["native"]
    assert "select_and_scatter_add" not in jaxprs["custom"]
    # the custom kernel gradient is k*k GEMMs; XLA's native one is a convolution
    assert "dot_general" in jaxprs["custom"]
    assert "dot_general" not in jaxprs["native"]
